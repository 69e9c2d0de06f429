"""`autoguidance import-edm2 SRC --config JSON --out DIR`: an official EDM2 network as a checkpoint folder."""
from __future__ import annotations

from ..checkpoint import load_config
from ..edm2.convert import import_edm2
from .common import command_line_of_argv

__all__ = ["add_parser"]


def _cmd_import(args) -> int:
    import pickle
    import struct
    import zipfile

    config = args.config
    try:
        out = import_edm2(args.src, args.out, config=config, trust_pickle=args.trust_pickle,
                          edm2_repo=args.edm2_repo, overwrite=args.force, meta={"command": command_line_of_argv()})
    except (struct.error, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, RuntimeError, IndexError) as e:
        raise ValueError(f"{args.src} is not a readable network file ({type(e).__name__}: {e}); is it truncated "
                         "or not a state dict?") from e
    cfg = load_config(out)["config"]
    print(f"saved {out}  (EDM2 {cfg['model_channels']} channels, label_dim {cfg['label_dim']}, "
          f"{cfg['img_channels']}x{cfg['img_resolution']}x{cfg['img_resolution']}); load it with "
          f"autoguidance.load({str(out)!r})")
    return 0


def add_parser(subparsers) -> None:
    """Add `autoguidance import-edm2 SRC --config JSON --out DIR [--trust-pickle --edm2-repo PATH]`."""
    p = subparsers.add_parser(
        "import-edm2", help="import an official NVlabs/edm2 network (state dict + settings) as a checkpoint folder",
        description="Write an official EDM2 network in this library's format (model.safetensors + config.json), "
                    "so that autoguidance.load(DIR) returns the denoiser.",
        epilog="Security: official .pkl network files execute code when unpickled (EDM2 stores each class's source "
               "in the pickle and runs it). They are refused unless you pass --trust-pickle together with "
               "--edm2-repo, the path of your own checkout of NVlabs/edm2; never pass --trust-pickle for a file "
               "you do not trust. The safe route: in your edm2 checkout, save net.state_dict() with torch.save "
               "(or safetensors) and json.dump(dict(net.init_kwargs)), then import those two files here.")
    p.add_argument("src", help="the network: a .safetensors or .pt state dict (read without executing code), or "
                               "an official .pkl (only with --trust-pickle --edm2-repo)")
    p.add_argument("--config", help="constructor settings as the official Precond takes them: a JSON file "
                                    "(img_resolution, img_channels, label_dim, model_channels, channel_mult, "
                                    "num_blocks, attn_resolutions, dropout, channels_per_head, ...) or an "
                                    "architecture name such as edm2-img512-s; required for state-dict files")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling a .pkl network, which EXECUTES CODE stored in the file; use only for "
                        "files you trust, and with --edm2-repo")
    p.add_argument("--edm2-repo", metavar="PATH", help="your own checkout of NVlabs/edm2, put on sys.path only "
                                                      "while the trusted pickle loads")
    p.add_argument("--force", action="store_true", help="replace an existing checkpoint folder at --out")
    p.set_defaults(func=_cmd_import)
