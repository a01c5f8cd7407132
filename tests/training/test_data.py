"""The training loader on real packed GSM8K shards: layout, checksums, order, resume, rank sharding."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from training.data import Loader, PackedShards, ShardChecksumError


def test_labels_and_mask_follow_pack_layout(packed):
    data = PackedShards(packed)
    assert data.seq_len == 256 and len(data) == sum(data.rows) > 100
    t = pa.ipc.open_file(pa.memory_map(str(packed / data.names[1]))).read_all()
    b = data.batch([int(data.offsets[1]) + r for r in range(4)])
    pb = b.packed
    assert pb.input_ids.shape == (4, 256)
    for r in range(4):
        row = t.slice(r, 1).to_pylist()[0]
        assert pb.input_ids[r].tolist() == row["input_ids"]
        assert b.sample_ids[r] == row["sample_ids"]
        want = torch.full((256,), -100)
        for i, (s, n, p) in enumerate(zip(row["sample_starts"], row["sample_lengths"], row["prompt_lengths"])):
            assert (pb.segment_ids[r, s : s + n] == i + 1).all()
            assert pb.position_ids[r, s : s + n].tolist() == list(range(n))
            assert pb.is_prompt[r, s : s + p].all() and not pb.is_prompt[r, s + p : s + n].any()
            # pack's doc: position t is labelled with token t+1 for t in [s+p-1, s+L-2]
            want[s + p - 1 : s + n - 1] = torch.tensor(row["input_ids"][s + p : s + n])
        end = row["sample_starts"][-1] + row["sample_lengths"][-1]
        assert (pb.segment_ids[r, end:] == 0).all() and (pb.input_ids[r, end:] == data.pad_id).all()
        assert torch.equal(pb.labels[r], want)


def test_answer_token_count_matches_manifest_and_labels(packed):
    data = PackedShards(packed)
    loader = Loader(data, micro_batch_size=len(data), seed=0)
    assert loader.global_answer_tokens() == data.manifest["counts"]["answer_tokens"]
    b = data.batch(list(range(40)))
    loader2 = Loader(data, micro_batch_size=40)
    loader2._order = lambda epoch: np.arange(len(data))  # identity order
    assert loader2.global_answer_tokens() == b.answer_tokens


def test_exact_resume_position(packed):
    data = PackedShards(packed)
    a = Loader(data, micro_batch_size=3, grad_accum=2, seed=7)
    for _ in range(5):
        a.next_step()
    state = json.loads(json.dumps(a.state_dict()))
    want = [[mb.seq_index for mb in a.next_step()[0]] for _ in range(70)]  # crosses an epoch boundary
    b = Loader(PackedShards(packed), micro_batch_size=3, grad_accum=2, seed=7)
    b.load_state_dict(state)
    got = [[mb.seq_index for mb in b.next_step()[0]] for _ in range(70)]
    assert got == want
    with pytest.raises(ValueError, match="seed"):
        Loader(data, micro_batch_size=3, grad_accum=2, seed=8).load_state_dict(state)


def test_two_ranks_disjoint_and_cover_the_epoch(packed):
    data = PackedShards(packed)
    N = len(data)
    ranks = [Loader(data, micro_batch_size=2, grad_accum=1, rank=r, world_size=2, seed=3) for r in range(2)]
    gb = ranks[0].global_batch
    seen = [[], []]
    for _ in range(N // gb):
        for r, ld in enumerate(ranks):
            micro, n = ld.next_step()
            seen[r] += [i for mb in micro for i in mb.seq_index]
    assert not set(seen[0]) & set(seen[1])
    both = set(seen[0]) | set(seen[1])
    assert len(both) == len(seen[0]) + len(seen[1]) == (N // gb) * gb
    assert both == set(ranks[0]._order(0)[: (N // gb) * gb].tolist())
    # the same seed gives the same order, another seed another
    assert Loader(data, micro_batch_size=2, seed=3).stream(0, 50) == Loader(data, micro_batch_size=2, seed=3).stream(0, 50)
    assert Loader(data, micro_batch_size=2, seed=3).stream(0, 50) != Loader(data, micro_batch_size=2, seed=4).stream(0, 50)


def test_corrupted_shard_is_named(packed, tmp_path):
    bad = tmp_path / "pack"
    shutil.copytree(packed, bad)
    victim = bad / "shard-00002.arrow"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    data = PackedShards(bad)  # shard 0 is fine
    data.batch([0])
    with pytest.raises(ShardChecksumError, match="shard-00002.arrow"):
        data.batch([int(data.offsets[2])])


@pytest.fixture(scope="module")
def packed_3_epochs(packed, run_stage, tmp_path_factory):
    """The same tokenized rows mixed over 3 epochs, then packed (epochs one after another)."""
    d = tmp_path_factory.mktemp("pack-3ep")
    t = packed.parent / "t"
    run_stage("stage", "mix", "--input", str(t), "--output", str(d / "m"), "--set", "epochs=3", "--no-progress")
    run_stage("stage", "pack", "--input", str(t), "--mix", str(d / "m"), "--output", str(d / "p"),
              "--set", "seq_len=256", "--set", "shard_tokens=8192", "--no-progress")
    return d / "p"


def _epoch_of(data: PackedShards) -> np.ndarray:
    import pyarrow as pa

    return np.concatenate([
        pa.ipc.open_file(pa.memory_map(str(data.folder / n), "r")).read_all().column("epoch").to_numpy()
        for n in data.names
    ])


def test_mix_epoch_k_is_trained_in_epoch_k(packed_3_epochs):
    """The reference's order: each pass over the pack trains mix epoch 0 (shuffled within), then
    epoch 1, then epoch 2; resuming anywhere continues the same stream."""
    data = PackedShards(packed_3_epochs)
    N = len(data)
    epoch = _epoch_of(data)
    assert [e for e, _, _ in data.epoch_blocks] == [0, 1, 2]
    assert all((epoch[a:b] == e).all() for e, a, b in data.epoch_blocks)
    ld = Loader(data, micro_batch_size=4, seed=1)
    for pass_ in range(2):
        order = np.asarray(ld.stream(pass_ * N, N))
        assert sorted(order.tolist()) == list(range(N))  # every sequence once per pass
        assert (np.diff(epoch[order]) >= 0).all()  # epoch 0's, then 1's, then 2's
        for e, a, b in data.epoch_blocks:  # shuffled within the epoch
            assert order[a:b].tolist() != list(range(a, b))
    assert ld.stream(0, N) != ld.stream(N, N)  # the next pass reshuffles
    # the former order mixes epochs; it stays available, and a checkpoint states its order
    old = Loader(data, micro_batch_size=4, seed=1, epoch_order="all")
    assert not (np.diff(epoch[np.asarray(old.stream(0, N))]) >= 0).all()
    for _ in range(7):
        ld.next_step()
    state = json.loads(json.dumps(ld.state_dict()))
    want = [mb.seq_index for _ in range(40) for mb in ld.next_step()[0]]
    again = Loader(PackedShards(packed_3_epochs), micro_batch_size=4, seed=1)
    again.load_state_dict(state)
    assert [mb.seq_index for _ in range(40) for mb in again.next_step()[0]] == want
    with pytest.raises(ValueError, match="epoch_order"):
        Loader(data, micro_batch_size=4, seed=1).load_state_dict({k: v for k, v in state.items() if k != "epoch_order"})


def test_full_loss_labels_every_next_token_and_counts_them(packed):
    # the ablation's first rung: the full causal LM loss labels prompt tokens too, and the step's
    # normaliser counts exactly the labelled tokens
    data = PackedShards(packed, loss="full")
    b = data.batch(list(range(40)))
    loader = Loader(data, micro_batch_size=40)
    loader._order = lambda epoch: np.arange(len(data))  # identity order
    assert loader.global_answer_tokens() == b.answer_tokens
    answer = PackedShards(packed).batch(list(range(40)))
    assert b.answer_tokens > answer.answer_tokens
    lab = answer.packed.labels
    assert torch.equal(b.packed.labels[lab != -100], lab[lab != -100])  # a superset of the answer labels
