"""EDM2 beyond the network itself (`autoguidance.nets.edm2`): importing official weights (`convert`), the papers'
ImageNet configurations (`presets`), and decoding ImageNet-512 latents with the Stable Diffusion VAE (`latent`)."""
