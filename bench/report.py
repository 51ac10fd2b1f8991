"""Copy the latest results into ``docs/benchmarks.md`` and its charts into ``docs/img/``.

Each ``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->`` block of the document is
replaced by ``bench/results/NAME.md``; ``bench/results/NAME.png`` becomes
``docs/img/bench-NAME.png``. Run it after ``bench/run-all``.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from bench import command

DOC = command.ROOT / "docs" / "benchmarks.md"
IMG = command.ROOT / "docs" / "img"
BLOCK = re.compile(r"(<!-- bench:([a-z-]+) -->\n)(.*?)(<!-- /bench:\2 -->)", re.S)


def update(doc: Path, results: Path, img: Path) -> list[str]:
    """Replace every block whose result exists; return the names updated."""
    text = doc.read_text()
    done: list[str] = []

    def fill(m: re.Match[str]) -> str:
        name = m[2]
        md = results / f"{name}.md"
        if not md.exists():
            return m[0]
        png = results / f"{name}.png"
        body = md.read_text().rstrip() + "\n"
        if png.exists():
            img.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, img / f"bench-{name}.png")
            body += f"\n![{name}](img/bench-{name}.png)\n"
        done.append(name)
        return f"{m[1]}{body}{m[4]}"

    doc.write_text(BLOCK.sub(fill, text))
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--results", type=Path, default=command.RESULTS)
    p.add_argument("--doc", type=Path, default=DOC)
    p.add_argument("--img", type=Path, default=IMG)
    args = p.parse_args(argv)
    names = update(args.doc, args.results, args.img)
    command.say(f"updated {args.doc} with: {', '.join(names) or 'nothing'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
