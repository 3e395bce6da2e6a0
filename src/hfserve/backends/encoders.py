"""The encoder tasks of the transformers backend: embeddings, sequence and token
classification, fill-mask.

How a request flows: the backend's task operation (``HuggingFaceBackend.embed`` and
its siblings) submits the request's token id lists to the backend's
:class:`~hfserve.backends.batching.MicroBatcher` under its kind (``"embed"``,
``"classify"``, ``"classify_tokens"``, ``"fill_mask"``, with fill-mask's ``top_k`` as
the option). The batcher merges concurrent requests of the same kind and option and
calls :meth:`EncoderTasks.run` in a worker thread with all their inputs: one
right-padded forward pass (:func:`~.padding.pad_batch`), one result per input, which
the batcher hands back to each request on the event loop (or, if the merged pass
raised, runs each request alone so that only the culprit fails).
"""

from __future__ import annotations

from typing import Any

import torch

from .padding import pad_batch


class EncoderTasks:
    """One forward pass per call over a batch of inputs (worker threads only)."""

    def __init__(
        self,
        model: Any,
        *,
        device: torch.device,
        pad_token_id: int,
        mask_token_id: int | None,
        pooling: tuple[str, bool],
        stats: dict[str, int],
    ):
        self.model = model
        self.device = device
        self.pad_token_id = pad_token_id
        self.mask_token_id = mask_token_id
        self.pooling = pooling  # (mode, normalize): "mean", "cls", "max" or "lasttoken"
        self.stats = stats  # the backend's counters: "encoder_forwards" is counted here

    def run(self, kind: str, inputs: list[list[int]], option: Any) -> list[Any]:
        """One forward pass over ``inputs``; one result per input (the batcher's ``RunFn``)."""
        if kind == "embed":
            return self.embed(inputs)
        if kind == "classify":
            return self.classify(inputs)
        if kind == "classify_pairs":
            return self.classify_pairs(inputs)
        if kind == "classify_tokens":
            return self.classify_tokens(inputs)
        if kind == "fill_mask":
            return self.fill_mask(inputs, option)
        raise ValueError(f"unknown encoder operation {kind}")

    def _forward(self, inputs: list[list[int]]) -> tuple[Any, torch.Tensor]:
        """Right-padded batch with an attention mask; positions and token types start at 0 per row."""
        ids, mask = pad_batch(inputs, self.pad_token_id, self.device)
        self.stats["encoder_forwards"] += 1
        with torch.inference_mode():
            return self.model(input_ids=ids, attention_mask=mask), mask

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        out, mask = self._forward(inputs)
        hidden = out.last_hidden_state.float()
        mode, normalize = self.pooling
        m = mask.unsqueeze(-1).to(hidden.dtype)
        if mode == "cls":
            pooled = hidden[:, 0]
        elif mode == "max":
            pooled = hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
        elif mode == "lasttoken":
            last = mask.sum(dim=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0]), last]
        else:
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled.tolist()

    def classify(self, inputs: list[list[int]]) -> list[list[float]]:
        out, _ = self._forward(inputs)
        return out.logits.float().tolist()

    def classify_pairs(self, inputs: list[list[int]]) -> list[list[float]]:
        """Text pairs, each given as ``[type_start, *input_ids]``: token type 1 from ``type_start``
        on (the second text, as the tokenizer marks it); no token types where none starts."""
        ids_only = [row[1:] for row in inputs]
        ids, mask = pad_batch(ids_only, self.pad_token_id, self.device)
        kwargs = {}
        if any(row[0] < len(row) - 1 for row in inputs):
            types = torch.zeros_like(ids)
            for r, row in enumerate(inputs):
                types[r, row[0] : len(row) - 1] = 1
            kwargs["token_type_ids"] = types
        self.stats["encoder_forwards"] += 1
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, **kwargs)
        return out.logits.float().tolist()

    def classify_tokens(self, inputs: list[list[int]]) -> list[list[list[float]]]:
        out, _ = self._forward(inputs)
        logits = out.logits.float()
        return [logits[row, : len(seq)].tolist() for row, seq in enumerate(inputs)]

    def fill_mask(self, inputs: list[list[int]], top_k: int) -> list[list[list[tuple[int, float]]]]:
        """Per input, per mask token, the ``top_k`` most probable (id, probability) pairs; with
        ``top_k`` 0 (``--return_raw_logits``) every vocabulary id's (id, raw logit) in id order."""
        out, _ = self._forward(inputs)
        results = []
        for row, seq in enumerate(inputs):
            per_mask = []
            for pos, tid in enumerate(seq):
                if tid == self.mask_token_id and top_k <= 0:
                    per_mask.append(list(enumerate(out.logits[row, pos].float().tolist())))
                elif tid == self.mask_token_id:
                    probs = torch.softmax(out.logits[row, pos].float(), dim=-1)
                    values, ids = torch.topk(probs, top_k)
                    per_mask.append(list(zip(ids.tolist(), values.tolist())))
            results.append(per_mask)
        return results
