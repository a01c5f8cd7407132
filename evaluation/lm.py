"""lm-evaluation-harness adapter for HRM-Text checkpoints (`@register_model("hrm")`).

Prompt layout (the training layout of pipeline/stages/tokenize.py, PrefixLM semantics):

    [BOQ][condition] context [EOQ] continuation
    '---- prompt: bidirectional ----' '-- causal --'

- loglikelihood(context, continuation): the harness context (few-shot examples included) is the
  instruction; the continuation is the response. The sum of log p(continuation token | prompt, earlier
  continuation tokens) is returned, where [EOQ] predicts the first continuation token, exactly as the
  answer-only loss is computed in training. The harness separates context and continuation with a
  target delimiter (" " for multiple choice); training responses never start with that space, so one
  leading space of the continuation is moved into nothing (stripped) - the same for every choice.
  `is_greedy` compares each continuation token with the argmax. A context too long for `max_length`
  loses tokens from its start ([BOQ][condition] kept), the same tokens for every continuation of that
  context (room is left for the longest), so the choices of an item are scored against one prompt.
  Shared prompts: under the PrefixLM mask the prompt attends only to itself, so its keys and values
  (in every HRM module call) do not depend on the continuation. Requests with the same context (the
  choices of a multiple-choice item) are scored from one prefill of the prompt into the KV cache: the
  last prompt position's logits score the first continuation token, and the rest of each continuation
  runs as one chunk against the cache (rewound to the prompt between choices). MMLU's four one-token
  choices cost one forward instead of four. `share_prompts=False` scores every request on its own (the
  reference; the two agree to float rounding).
- generate_until(context, {until, max_gen_toks}): the prompt is [BOQ][condition] context [EOQ]; requests
  are sorted by prompt length and batched (`batch_size`), decoded greedily with the KV cache
  (model.generate), stopping at [EOA], at any `until` string (checked on the decoded text; the text
  is cut before it), or after max_gen_toks tokens. A `condition` generation kwarg (a task's
  generation_kwargs, e.g. the held-out tasks of evaluation.heldout) sets that request's condition.
  The paper's protocol (evaluation.paper, tasks written by evaluation.tasks.write_paper_tasks) adds
  three kwargs, the reference engine's behaviour: `strip` (the context is stripped first),
  `max_context` (prompt + answer fit in min(max_context, the model's max_seq_len) tokens: the answer
  may use what the prompt leaves, capped by max_gen_toks when that is not None) and `overlong: empty`
  (a prompt of max_context tokens or more is not cut but answered with "", counted in `overlong`).
- loglikelihood_rolling(text): an empty instruction, [BOQ][condition][EOQ], and the text as the
  response, scored in disjoint windows of max_length - 3 tokens (each window a fresh sample).
- tokenizer: the checkpoint's own (tokenizer.json beside its config.json) unless one is given; a given
  one must be the file the checkpoint records (sha256), or for checkpoints without that record have the
  model's vocabulary size (evaluation.locate.checkpoint_tokenizer).
- condition: the condition of the prompt ("direct" by default; evaluation.run uses "cot" for the harness's
  chain-of-thought tasks), a comma-separated tag list ("synth,cot"): one condition token per tag after
  [BOQ], in the given order, as in training (pipeline.stages.tokenize, SpecialIds.condition_ids).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from evaluation.locate import checkpoint_tokenizer
from model import generate, load_checkpoint, pad_pairs
from model.generate import _left_pad
from pipeline.stages.tokenize import load_tokenizer, special_ids


@register_model("hrm")
class HRMLM(LM):
    def __init__(
        self,
        pretrained: str,
        tokenizer: str | None = None,
        condition: str = "direct",
        batch_size: int | str = 8,
        max_length: int = 3072,
        max_gen_toks: int = 256,
        device: str = "cpu",
        dtype: str | None = None,
        use_cache: bool = True,
        share_prompts: bool = True,
        cache_budget_gb: float = 4.0,
        progress: bool = True,
        **kwargs,
    ) -> None:
        super().__init__()
        # the checkpoint's own tokenizer; an explicit one is checked against it (evaluation.locate)
        self.tok, self.meta = load_tokenizer(checkpoint_tokenizer(pretrained, tokenizer))
        self.model = load_checkpoint(pretrained, device=device, dtype=getattr(torch, dtype) if dtype else None).eval()
        self.ids = special_ids(self.meta)
        self.condition = condition
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        self.model_max = int(self.model.cfg.max_seq_len)
        self.max_length = min(int(max_length), self.model_max)  # what training fed at most
        self.overlong = 0  # paper-protocol prompts answered "" for not fitting their context (see the docstring)
        self.max_gen_toks = int(max_gen_toks)
        self.use_cache = bool(use_cache)
        self.share_prompts = bool(share_prompts)
        self.progress = bool(progress)
        self._quiet = not self.progress
        self.cache_budget = float(cache_budget_gb) * 2**30  # bytes of KV cache per prefill batch
        self._device = torch.device(device)

    # --- helpers -------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def prompt_ids(self, context: str, room: int = 0, condition: str | None = None) -> list[int]:
        """[BOQ][condition tags] context [EOQ], the context cut from its start to leave `room` tokens
        (condition: self.condition unless given)."""
        head = [self.ids.boq, *self.ids.condition_ids(condition or self.condition)]
        ctx = self.encode(context)
        keep = max(self.max_length - room - len(head) - 1, 0)
        ctx = ctx[len(ctx) - keep :] if len(ctx) > keep else ctx
        return head + ctx + [self.ids.eoq]

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(response | prompt), all greedy) per (prompt ids, response ids), one batch."""
        batch = pad_pairs(pairs, self.ids.pad)  # (B, T) each
        ids, seg, prm, pos = batch["input_ids"], batch["segment_ids"], batch["is_prompt"], batch["position_ids"]
        dev = self._device
        logits = self.model(ids.to(dev), segment_ids=seg.to(dev), position_ids=pos.to(dev), is_prompt=prm.to(dev),
                            attn_backend="sdpa").logits.float()  # (B, T, V)
        logp = F.log_softmax(logits, dim=-1)
        out = []
        for b, (p, r) in enumerate(pairs):
            at = torch.arange(len(p) - 1, len(p) + len(r) - 1, device=logp.device)  # positions predicting r
            tgt = torch.tensor(r, device=logp.device)
            lp = logp[b, at].gather(-1, tgt[:, None]).squeeze(-1)  # (len(r),)
            greedy = bool((logp[b, at].argmax(-1) == tgt).all())
            out.append((float(lp.sum()), greedy))
        return out

    def _batched_scores(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        res: list = [None] * len(pairs)
        bar = tqdm(total=len(pairs), desc="score", unit="seq", disable=self._quiet or len(pairs) < 2 * self.batch_size,
                   leave=False)
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            for i, v in zip(idx, self.score([pairs[i] for i in idx])):
                res[i] = v
            bar.update(len(idx))
        bar.close()
        return res

    @torch.no_grad()
    def _shared_prompt_scores(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """The scores of `_batched_scores`, one prefill per distinct prompt (see the module docstring)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (p, _) in enumerate(pairs):
            groups.setdefault(tuple(p), []).append(i)
        prompts = sorted(groups, key=len, reverse=True)
        cfg = self.model.cfg
        p_ = self.model.lm_head.weight
        per_pos = 2 * cfg.num_calls * cfg.layers_per_call * cfg.num_heads * cfg.head_dim * p_.element_size()
        dev = p_.device
        res: list = [None] * len(pairs)
        s = 0
        bar = tqdm(total=len(pairs), desc="loglikelihood", unit="req", disable=self._quiet, leave=False)
        while s < len(prompts):
            # as many prompts as batch_size and the cache budget allow (the longest come first)
            longest = len(prompts[s]) + max(len(pairs[i][1]) for i in groups[prompts[s]])
            rows = max(1, min(self.batch_size, int(self.cache_budget // max(per_pos * longest, 1))))
            batch = prompts[s : s + rows]
            s += len(batch)
            members = [groups[p] for p in batch]
            B = len(batch)
            L = max(len(pairs[i][1]) for m in members for i in m) - 1  # continuation tokens fed as input
            ids, seg, pos, prm, lengths = _left_pad(batch, self.ids.pad, dev)
            cache = self.model.new_cache(B, ids.shape[1] + max(L, 0))
            first = F.log_softmax(self.model(ids, segment_ids=seg, position_ids=pos, is_prompt=prm, cache=cache,
                                             last_logits_only=True).logits[:, -1].float(), dim=-1)  # (B, V)
            prompt_len = cache.length
            for j in range(max(len(m) for m in members)):
                todo = [(b, m[j]) for b, m in enumerate(members) if j < len(m)]
                Lj = max(len(pairs[i][1]) for _, i in todo) - 1
                if Lj > 0:
                    cache.length = prompt_len  # rewind: this choice overwrites the previous one's positions
                    x = torch.full((B, Lj), self.ids.pad, dtype=torch.long)
                    for b, i in todo:
                        r = pairs[i][1]
                        x[b, : len(r) - 1] = torch.tensor(r[:-1])
                    # every row of the chunk is a causal continuation (segment 1); rows without a j-th
                    # choice and positions past a choice's end are never read
                    cpos = lengths[:, None] + torch.arange(Lj, device=dev)[None, :]
                    logits = self.model(x.to(dev), segment_ids=torch.ones(B, Lj, dtype=torch.long, device=dev),
                                        position_ids=cpos, is_prompt=torch.zeros(B, Lj, dtype=torch.bool, device=dev),
                                        cache=cache).logits.float()
                    lp = F.log_softmax(logits, dim=-1)  # (B, Lj, V)
                for b, i in todo:
                    r = pairs[i][1]
                    total = float(first[b, r[0]])
                    greedy = int(first[b].argmax()) == r[0]
                    if len(r) > 1:
                        tgt = torch.tensor(r[1:], device=dev)
                        rows_lp = lp[b, : len(r) - 1]
                        total += float(rows_lp.gather(-1, tgt[:, None]).sum())
                        greedy = greedy and bool((rows_lp.argmax(-1) == tgt).all())
                    res[i] = (total, greedy)
            bar.update(sum(len(m) for m in members))
        bar.close()
        return res

    # --- the LM interface --------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._quiet = disable_tqdm or not self.progress
        conts = []
        room: dict[str, int] = {}  # per context: the longest of its continuations
        for req in requests:
            context, continuation = req.args
            cont = self.encode(continuation[1:] if continuation.startswith(" ") else continuation)
            if not cont:
                raise ValueError(f"hrm: empty continuation for context {context[-80:]!r}")
            cont = cont[-(self.max_length - 3) :]
            conts.append(cont)
            room[context] = max(room.get(context, 0), len(cont))
        # a context too long is cut the same way for all its continuations (the choices of one item see
        # the same prompt, and share one prefill)
        prompts = {c: self.prompt_ids(c, room=n) for c, n in room.items()}
        pairs = [(prompts[req.args[0]], cont) for req, cont in zip(requests, conts)]
        res = self._shared_prompt_scores(pairs) if self.share_prompts else self._batched_scores(pairs)
        for req, r in zip(requests, res):
            self.cache_hook.add_partial("loglikelihood", req.args, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        self._quiet = disable_tqdm or not self.progress
        head = [self.ids.boq, *self.ids.condition_ids(self.condition), self.ids.eoq]
        W = self.max_length - len(head)
        out = []
        for req in requests:
            (text,) = req.args[:1]
            toks = self.encode(text)
            pairs = [(head, toks[s : s + W]) for s in range(0, len(toks), W)]
            total = sum(lp for lp, _ in self._batched_scores(pairs)) if pairs else 0.0
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        self._quiet = disable_tqdm or not self.progress
        reqs = []  # (prompt ids, until, tokens to generate at most) or None: overlong, answered ""
        for req in requests:
            context, kw = req.args
            kw = dict(kw or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if kw.get("strip"):
                context = context.strip()
            cap = kw.get("max_gen_toks", self.max_gen_toks)
            if kw.get("max_context") is None:
                max_new = int(cap if cap is not None else self.max_gen_toks)
                reqs.append((self.prompt_ids(context, room=max_new, condition=kw.get("condition")), until, max_new))
                continue
            limit = min(int(kw["max_context"]), self.model_max)
            ids = [self.ids.boq, *self.ids.condition_ids(kw.get("condition") or self.condition),
                   *self.encode(context), self.ids.eoq]
            if len(ids) >= limit:
                if kw.get("overlong", "empty") != "empty":
                    raise ValueError(f"hrm: overlong={kw.get('overlong')!r}: only 'empty' is known")
                reqs.append(None)
                self.overlong += 1
                continue
            budget = limit - len(ids)
            reqs.append((ids, until, budget if cap is None else min(budget, int(cap))))
        # batch requests with the same stop strings, longest prompts first; each row stops at its own budget
        todo = [i for i, r in enumerate(reqs) if r is not None]
        order = sorted(todo, key=lambda i: (tuple(reqs[i][1]), -len(reqs[i][0]), -reqs[i][2]))
        res: list = ["" if r is None else None for r in reqs]
        s = 0
        bar = tqdm(total=len(reqs), desc="generate_until", unit="req", disable=self._quiet, leave=False)
        bar.update(len(reqs) - len(todo))
        while s < len(order):
            key = tuple(reqs[order[s]][1])
            idx = [order[s]]
            while len(idx) < self.batch_size and s + len(idx) < len(order) and \
                    tuple(reqs[order[s + len(idx)]][1]) == key:
                idx.append(order[s + len(idx)])
            s += len(idx)
            for i, text in zip(idx, self.generate_batch([reqs[i][0] for i in idx], list(key), [reqs[i][2] for i in idx])):
                res[i] = text
            bar.update(len(idx))
        bar.close()
        for req, r in zip(requests, res):
            self.cache_hook.add_partial("generate_until", req.args, r)
        return res

    def generate_batch(self, prompts: list[list[int]], until: list[str], max_new: int | list[int]) -> list[str]:
        """Greedy continuations of the prompts, cut before the first `until` string; `max_new`: tokens
        at most, one number for all rows or one per row."""
        budgets = [max_new] * len(prompts) if isinstance(max_new, int) else list(max_new)

        def stop_fn(row: int, toks: list[int]) -> bool:
            if len(toks) >= budgets[row]:
                return True
            if not until:
                return False
            tail = self.decode(toks[-32:])  # stop strings are short: only the tail needs a look
            return any(u in tail for u in until)

        outs = generate(self.model, prompts, max(budgets), stop_token_ids=[self.ids.eoa], stop_fn=stop_fn,
                        use_cache=self.use_cache, pad_id=self.ids.pad)
        texts = []
        for o in outs:
            t = self.decode(o)
            cut = min((t.find(u) for u in until if u and u in t), default=-1)
            texts.append(t[:cut] if cut >= 0 else t)
        return texts
