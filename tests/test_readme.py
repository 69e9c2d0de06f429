"""The README's example of guiding your own denoiser runs as written (on 4 images instead of 64)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_denoiser_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    code = next(b for b in blocks if "ag.generate(" in b)
    assert "range(64)" in code and "arange(64)" in code
    scope: dict = {}
    exec(compile(code.replace("64", "4") + "\nassert x.shape == (4, 1, 14, 14)\n", "README.md", "exec"), scope)
    assert scope["x"].isfinite().all()
