"""Write the demo's figures and the commit under the README's comparison picture (infra/scripts/retake_screenshots.sh).

    python infra/scripts/readme_caption.py DEMO_WORKDIR COMMIT

Reads the upscale step's figures from DEMO_WORKDIR/state.json (PSNR-Y and high-frequency energy of VARSR and
bicubic against the HR, as `varsr demo` computed and logged them) and replaces the text between the README's
``<!-- demo-figures -->`` and ``<!-- /demo-figures -->`` markers.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def caption(info: dict, commit: str) -> str:
    return (
        f"Held-out motorcycle, ×4: VARSR **{info['psnr_y_varsr']:.2f} dB PSNR-Y** with high-frequency energy "
        f"**{info['hf_energy_varsr']:.2f}**, bicubic {info['psnr_y_bicubic']:.2f} dB with "
        f"{info['hf_energy_bicubic']:.2f}. Taken at commit `{commit}` by "
        "`bash infra/scripts/retake_screenshots.sh`, which runs the demo and retakes every picture in "
        "`docs/screenshots/`."
    )


def main(workdir: str, commit: str) -> None:
    info = json.loads((Path(workdir) / "state.json").read_text())["upscale"]["info"]
    readme = ROOT / "README.md"
    text = readme.read_text()
    new, n = re.subn(
        r"(<!-- demo-figures -->\n).*?(\n<!-- /demo-figures -->)",
        lambda m: m.group(1) + caption(info, commit) + m.group(2),
        text,
        flags=re.S,
    )
    if n != 1:
        sys.exit("README.md has no <!-- demo-figures --> ... <!-- /demo-figures --> block")
    readme.write_text(new)
    print(
        json.dumps(
            {
                "commit": commit,
                **{k: info[k] for k in ("psnr_y_varsr", "psnr_y_bicubic", "hf_energy_varsr", "hf_energy_bicubic")},
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
