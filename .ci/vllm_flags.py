"""Regenerate src/hfserve/vllm_flags.json from the installed vLLM: the names of vLLM's flags, so that
hfserve without vLLM still recognises them (named as having no effect, instead of unknown).

    python .ci/vllm_flags.py          # rewrite the snapshot
    python .ci/vllm_flags.py --check  # exit 1 when the snapshot differs from the installed vLLM

tests/test_cli_compat.py runs the check where vLLM is installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SNAPSHOT = Path(__file__).resolve().parent.parent / "src" / "hfserve" / "vllm_flags.json"


def snapshot() -> dict:
    import vllm

    from hfserve import cli

    parser, fields = cli._vllm_parser()
    flags = []
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "model_tag"):
            continue
        switch = action.nargs == 0
        entry = {"dest": action.dest, "options": sorted(action.option_strings), "engine": action.dest in fields}
        if switch:  # the value each spelling stores (vLLM's --x / --no-x)
            entry["switch"] = {o: not o.startswith("--no-") for o in action.option_strings}
        flags.append(entry)
    flags.sort(key=lambda e: e["dest"])
    return {"vllm": vllm.__version__, "flags": flags}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    data = snapshot()
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    if args.check:
        if SNAPSHOT.read_text() != text:
            print(f"{SNAPSHOT} differs from vLLM {data['vllm']}: run python .ci/vllm_flags.py", file=sys.stderr)
            return 1
        return 0
    SNAPSHOT.write_text(text)
    print(f"wrote {len(data['flags'])} flags of vLLM {data['vllm']} to {SNAPSHOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
