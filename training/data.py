"""The training data loader over the pack stage's Arrow shards.

* Shards are memory-mapped (pa.memory_map + Arrow IPC file reader): a batch copies only its own rows.
* Each shard's sha256 is checked against the pack folder's manifest.json ("outputs") before first use;
  a mismatch raises ShardChecksumError naming the shard.
* Order (`epoch_order="per_epoch"`, the default, as the reference trains): a pack holds the mix's
  epochs one after another (pack.py writes every sequence of mix epoch k before those of k+1, and
  records per shard how many sequences each epoch has). One pass over the pack is mix epoch 0's
  sequences in a seeded permutation (seed, pass, epoch), then epoch 1's, ...: mix epoch k is trained
  in epoch k, shuffled within it, never mixed with another epoch. The stream of sequences is pass 0,
  then pass 1 (the same epochs, reshuffled), ... (an endless stream). `epoch_order="all"` is the
  former order: each pass one permutation (seed, pass) of every sequence of the folder. A pack whose
  manifest has no per-shard "epochs" counts is one block (the same as "all").
  Optimizer step s consumes the next `global_batch` sequences of the stream; rank r of w takes the
  positions r, r + w, r + 2w, ... of that slice (disjoint across ranks, together exactly the slice),
  and splits them into grad_accum micro batches of micro_batch_size.
* The loader state is one integer, the stream position of the next step (`state_dict()`, with the
  seed, global batch and epoch order it is valid for); it is saved in every checkpoint, so a resumed
  run continues at the exact next sequence. A checkpoint without an "epoch_order" was made with "all".
* Each micro batch carries input ids, labels (answer-only, or every next token with loss="full")
  and the PrefixLM/packing metadata
  (segment_ids, position_ids, is_prompt), all built by model.metadata_from_boundaries /
  model.build_labels from the shard's sample_starts / sample_lengths / prompt_lengths, plus the
  sample ids of its sequences (to report a bad batch).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from model import PackedBatch, build_labels, metadata_from_boundaries


class ShardChecksumError(RuntimeError):
    pass


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


@dataclass
class Batch:
    """One micro batch: the model's inputs plus lineage."""

    packed: PackedBatch
    sample_ids: list[list[str]]  # per row, the sample ids packed in it
    seq_index: list[int]  # global sequence index of each row

    @property
    def answer_tokens(self) -> int:
        return int((self.packed.labels != -100).sum())


class PackedShards:
    """Random access to the sequences of a pack folder (memory-mapped, checksum-verified)."""

    def __init__(self, folder: str | Path, *, verify: bool = True, loss: str = "answer") -> None:
        self.folder = Path(folder)
        mpath = self.folder / "manifest.json"
        if not mpath.exists():
            raise FileNotFoundError(f"{mpath} not found: --shards must be a pack stage folder")
        self.manifest = json.loads(mpath.read_text())
        outputs = self.manifest.get("outputs", {})
        self.names = sorted(n for n in outputs if n.startswith("shard-") and n.endswith(".arrow"))
        if not self.names:
            raise ValueError(f"{mpath}: no shard-*.arrow in its outputs")
        self.rows = [int(outputs[n]["rows"]) for n in self.names]
        self.offsets = np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64)
        self.verify = verify
        self.loss = loss
        self._tables: dict[int, pa.Table] = {}
        first = self._table(0)
        meta = first.schema.metadata or {}
        self.seq_len = int(meta[b"seq_len"])
        self.pad_id = int(meta[b"pad_id"])
        self.epoch_blocks = self._epoch_blocks(outputs)

    def _epoch_blocks(self, outputs: dict) -> list[tuple[int, int, int]]:
        """(epoch, first, end) global sequence ranges of the mix epochs, in order, from the shard
        records' per-epoch sequence counts (pack.py writes the epochs one after another); one block
        (-1, 0, N) when a shard record lacks the counts."""
        blocks: list[list[int]] = []
        pos = 0
        for n, rows in zip(self.names, self.rows):
            ep = outputs[n].get("epochs")
            if not isinstance(ep, dict) or sum(int(c) for c in ep.values()) != rows:
                return [(-1, 0, len(self))]
            for e, c in sorted(((int(e), int(c)) for e, c in ep.items())):
                if blocks and blocks[-1][0] == e:
                    blocks[-1][2] += c
                else:
                    if blocks and e < blocks[-1][0]:
                        raise ValueError(f"{self.folder}: shard {n} holds epoch {e} after epoch {blocks[-1][0]}: "
                                         "the pack's epochs are not in order")
                    blocks.append([e, pos, pos + c])
                pos += c
        return [(e, a, b) for e, a, b in blocks]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _table(self, k: int) -> pa.Table:
        t = self._tables.get(k)
        if t is None:
            name = self.names[k]
            path = self.folder / name
            if not path.exists():
                raise FileNotFoundError(f"shard {name} listed in {self.folder / 'manifest.json'} is missing")
            if self.verify:
                want = self.manifest["outputs"][name].get("sha256")
                got = sha256_file(path)
                if want != got:
                    raise ShardChecksumError(
                        f"shard {path} failed its checksum: sha256 {got} but the pack manifest says {want} "
                        "(the file was changed or corrupted after packing; re-run the pack stage)"
                    )
            t = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
            if t.num_rows != self.rows[k]:
                raise ShardChecksumError(f"shard {path} has {t.num_rows} rows, manifest says {self.rows[k]}")
            self._tables[k] = t
        return t

    def locate(self, i: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return k, i - int(self.offsets[k])

    def batch(self, indices: list[int]) -> Batch:
        """The rows with these global sequence indices, in this order."""
        T = self.seq_len
        ids = np.empty((len(indices), T), dtype=np.int64)
        bounds, sample_ids = [], []
        for b, i in enumerate(indices):
            k, r = self.locate(i)
            t = self._table(k)
            row = t.slice(r, 1)
            ids[b] = row.column("input_ids").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            starts = row.column("sample_starts")[0].as_py()
            lens = row.column("sample_lengths")[0].as_py()
            plens = row.column("prompt_lengths")[0].as_py()
            bounds.append([(s, p, n) for s, p, n in zip(starts, plens, lens)])
            sample_ids.append(row.column("sample_ids")[0].as_py())
        input_ids = torch.from_numpy(ids)
        seg, pos, prm = metadata_from_boundaries(bounds, T)
        labels = build_labels(input_ids, seg, prm, self.loss)
        return Batch(PackedBatch(input_ids, seg, pos, prm, labels), sample_ids, list(indices))


class Loader:
    """Deterministic, resumable, rank-sharded stream of optimizer steps (see the module docstring)."""

    def __init__(
        self, data: PackedShards, *, micro_batch_size: int, grad_accum: int = 1, rank: int = 0,
        world_size: int = 1, seed: int = 1234, epoch_order: str = "per_epoch",
    ) -> None:
        assert 0 <= rank < world_size
        if epoch_order not in ("per_epoch", "all"):
            raise ValueError(f"epoch_order must be 'per_epoch' or 'all', got {epoch_order!r}")
        self.data, self.mbs, self.accum = data, micro_batch_size, grad_accum
        self.rank, self.world, self.seed, self.epoch_order = rank, world_size, seed, epoch_order
        self.position = 0  # stream position of the next step's first sequence
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    @property
    def global_batch(self) -> int:
        return self.mbs * self.accum * self.world

    def _order(self, pass_: int) -> np.ndarray:
        """Global sequence indices of one pass over the pack, in training order."""
        if pass_ != self._perm_epoch:
            if self.epoch_order == "all":
                perm = np.random.default_rng([self.seed, pass_]).permutation(len(self.data))
            else:
                perm = np.concatenate([
                    a + np.random.default_rng([self.seed, pass_, max(e, 0)]).permutation(b - a)
                    for e, a, b in self.data.epoch_blocks
                ]).astype(np.int64)
            self._perm, self._perm_epoch = perm, pass_
        return self._perm

    def stream(self, start: int, n: int) -> list[int]:
        """Global sequence indices at stream positions [start, start + n)."""
        N = len(self.data)
        out = []
        for p in range(start, start + n):
            out.append(int(self._order(p // N)[p % N]))
        return out

    def step_indices(self, position: int | None = None) -> list[list[int]]:
        """This rank's micro batches (grad_accum lists of micro_batch_size indices) of one step."""
        p = self.position if position is None else position
        mine = self.stream(p, self.global_batch)[self.rank :: self.world]
        return [mine[j * self.mbs : (j + 1) * self.mbs] for j in range(self.accum)]

    def global_answer_tokens(self, position: int | None = None) -> int:
        """Labelled tokens of the whole step (all ranks): the loss normaliser, computed from the data
        alone so no collective is needed. Answer-only loss: the response tokens after the first
        position of each sample; full LM loss (`data.loss == "full"`): every token after the first."""
        p = self.position if position is None else position
        full = self.data.loss == "full"
        total = 0
        for i in self.stream(p, self.global_batch):
            k, r = self.data.locate(i)
            row = self.data._table(k).slice(r, 1)
            lens = row.column("sample_lengths")[0].as_py()
            plens = row.column("prompt_lengths")[0].as_py()
            total += sum(max(n - 1, 0) if full else n - max(pl, 1) for n, pl in zip(lens, plens))
        return total

    def next_step(self) -> tuple[list[Batch], int]:
        """(this rank's micro batches, global answer-token count) of the next step; advances."""
        micro = [self.data.batch(ix) for ix in self.step_indices()]
        n = self.global_answer_tokens()
        self.position += self.global_batch
        return micro, n

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "global_batch": self.global_batch,
                "epoch_order": self.epoch_order}

    def load_state_dict(self, state: dict) -> None:
        order = state.get("epoch_order", "all")
        if state.get("seed") != self.seed or state.get("global_batch") != self.global_batch or order != self.epoch_order:
            raise ValueError(
                f"cannot resume the data order: checkpoint has seed={state.get('seed')} global_batch="
                f"{state.get('global_batch')} epoch_order={order}, this run seed={self.seed} "
                f"global_batch={self.global_batch} epoch_order={self.epoch_order}"
            )
        self.position = int(state["position"])
