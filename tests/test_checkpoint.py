"""Checkpoint I/O: what the merge engine relies on when it reads models and writes the merged one."""

from __future__ import annotations

import errno
import json
import mmap
import os
import resource
import struct
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merge_core.checkpoint import CheckpointReader, ShardedWriter, atomic_output_dir, parse_size
from merge_core.errors import EvomergeError

MIXED = {
    "embed.weight": torch.randn(10, 6).to(torch.bfloat16),
    "layers.0.weight": torch.randn(6, 6),
    "layers.0.bias": torch.randn(6).to(torch.float16),
    "layers.1.weight": torch.randn(6, 6).to(torch.bfloat16),
    "norm.weight": torch.randn(3),
    "scale": torch.tensor(2.5),
}


def layout_of(tensors):
    return {name: (t.shape, t.dtype) for name, t in tensors.items()}


def write_checkpoint(path, tensors, *, max_shard_bytes=0, config=None, order=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    with ShardedWriter(path, layout_of(tensors), max_shard_bytes=max_shard_bytes) as writer:
        for name in order or tensors:
            writer.write(name, tensors[name])
    return path


def read_all_with_safetensors(path):
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def assert_same_tensors(actual, expected):
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


# --------------------------------------------------------------------------------------------- parse_size


@pytest.mark.parametrize("value, expected", [
    (1234, 1234), ("1234", 1234), ("5B", 5 * 10**9), ("5GB", 5 * 10**9), ("500MB", 500 * 10**6),
    ("1.5G", 1_500_000_000), ("2k", 2000), ("2GiB", 2 * 2**30), (" 10 mb ", 10 * 10**6), ("0", 0),
])
def test_parse_size_reads_mergekit_and_common_units(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["", "GB", "5XB", "-1GB", "1.2.3G", "five", -5, True])
def test_parse_size_rejects_nonsense(value):
    with pytest.raises(EvomergeError, match="shard size"):
        parse_size(value)


# --------------------------------------------------------------------------------------------- writer


def test_single_shard_round_trip_keeps_every_dtype_bit_exact(tmp_path):
    out = write_checkpoint(tmp_path / "m", MIXED)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert_same_tensors(read_all_with_safetensors(out), MIXED)
    reader = CheckpointReader(out)
    assert_same_tensors({name: reader.get(name) for name in reader.names}, MIXED)


def test_multi_shard_output_has_hf_names_and_a_correct_index(tmp_path):
    tensors = {f"layers.{i}.weight": torch.randn(16, 16).to(torch.bfloat16) for i in range(5)}  # 512 B each
    out = write_checkpoint(tmp_path / "m", tensors, max_shard_bytes=1100)
    shards = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
              "model-00003-of-00003.safetensors"]
    assert sorted(os.listdir(out)) == sorted(["config.json", "model.safetensors.index.json", *shards])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 512
    assert index["weight_map"] == {
        "layers.0.weight": shards[0], "layers.1.weight": shards[0], "layers.2.weight": shards[1],
        "layers.3.weight": shards[1], "layers.4.weight": shards[2]}
    for shard in shards:
        with safe_open(out / shard, framework="pt") as handle:
            assert set(handle.keys()) == {n for n, s in index["weight_map"].items() if s == shard}
    assert_same_tensors(read_all_with_safetensors(out), tensors)


def test_a_tensor_bigger_than_the_shard_limit_gets_a_shard_of_its_own(tmp_path):
    tensors = {"small": torch.zeros(2), "big": torch.ones(100), "tail": torch.zeros(2)}
    out = write_checkpoint(tmp_path / "m", tensors, max_shard_bytes=16)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) == 3
    assert_same_tensors(read_all_with_safetensors(out), tensors)


def test_tensors_can_be_written_in_any_order_and_from_threads(tmp_path):
    tensors = {f"w{i}": torch.randn(64, 32).to(torch.bfloat16) for i in range(12)}
    out = tmp_path / "m"
    out.mkdir()
    with ShardedWriter(out, layout_of(tensors), max_shard_bytes=10_000) as writer:
        names = list(reversed(tensors))
        threads = [threading.Thread(target=lambda part: [writer.write(n, tensors[n]) for n in part],
                                    args=(names[i::3],)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert_same_tensors(read_all_with_safetensors(out), tensors)


def test_writer_casts_to_the_layout_dtype_and_accepts_non_contiguous_tensors(tmp_path):
    source = torch.randn(8, 4)
    out = tmp_path / "m"
    with ShardedWriter(out, {"w": (torch.Size([4, 8]), torch.bfloat16)}, max_shard_bytes=0) as writer:
        writer.write("w", source.t())
    assert_same_tensors(read_all_with_safetensors(out), {"w": source.t().to(torch.bfloat16)})


def test_transformers_loads_the_written_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)
    original = LlamaForCausalLM(config).to(torch.bfloat16)
    state = {name: t.detach().clone() for name, t in original.state_dict().items()}
    out = write_checkpoint(tmp_path / "m", state, max_shard_bytes=20_000, config=config.to_dict())
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert_same_tensors(loaded.state_dict(), state)


@pytest.mark.parametrize("name, tensor, message", [
    ("nope", torch.zeros(2), "not in the output layout"),
    ("w", torch.zeros(3), "has shape"),
])
def test_writer_rejects_tensors_that_do_not_match_the_layout(tmp_path, name, tensor, message):
    writer = ShardedWriter(tmp_path, {"w": (torch.Size([2]), torch.float32)}, max_shard_bytes=0)
    with pytest.raises(ValueError, match=message):
        writer.write(name, tensor)


def test_writer_rejects_a_second_write_of_the_same_tensor(tmp_path):
    writer = ShardedWriter(tmp_path, {"w": (torch.Size([2]), torch.float32)}, max_shard_bytes=0)
    writer.write("w", torch.zeros(2))
    with pytest.raises(ValueError, match="written twice"):
        writer.write("w", torch.ones(2))


def test_close_fails_when_a_tensor_was_never_written(tmp_path):
    writer = ShardedWriter(tmp_path, layout_of(MIXED), max_shard_bytes=0)
    writer.write("embed.weight", MIXED["embed.weight"])
    with pytest.raises(ValueError, match="never written"):
        writer.close()


# --------------------------------------------------------------------------------------------- reader


def test_reader_knows_names_shapes_dtypes_and_config_of_a_sharded_checkpoint(tmp_path):
    out = write_checkpoint(tmp_path / "m", MIXED, max_shard_bytes=100, config={"model_type": "qwen2", "x": 1})
    reader = CheckpointReader(out)
    assert reader.path == out
    assert reader.config == {"model_type": "qwen2", "x": 1}
    assert set(reader.names) == set(MIXED)
    assert reader.has("norm.weight") and "norm.weight" in reader and not reader.has("missing")
    for name, tensor in MIXED.items():
        assert reader.shape(name) == tensor.shape
        assert reader.dtype(name) == tensor.dtype
        assert torch.equal(reader.get(name), tensor)


def test_reader_maps_tensors_lazily_instead_of_reading_the_file(tmp_path):
    """A 4 GiB sparse tensor opens and reads instantly: nothing is read until a page is touched."""
    header = json.dumps({"huge": {"dtype": "BF16", "shape": [65536, 32768], "data_offsets": [0, 2**32]}}).encode()
    header += b" " * (-len(header) % 8)
    (tmp_path / "config.json").write_text("{}")
    with open(tmp_path / "model.safetensors", "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        handle.truncate(8 + len(header) + 2**32)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reader = CheckpointReader(tmp_path)
    assert reader.shape("huge") == (65536, 32768)
    huge = reader.get("huge")
    assert huge[12345, :4].tolist() == [0.0] * 4
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before < 2**28


def test_get_converts_dtype_on_request(tmp_path):
    reader = CheckpointReader(write_checkpoint(tmp_path / "m", MIXED))
    got = reader.get("embed.weight", dtype=torch.float32)
    assert got.dtype == torch.float32
    assert torch.equal(got, MIXED["embed.weight"].float())


@pytest.mark.parametrize("tensors", [MIXED, {"big": torch.randn(512, 1024)}], ids=["small", "big"])
def test_in_place_changes_to_a_read_tensor_reach_neither_the_file_nor_later_reads(tmp_path, tensors):
    out = write_checkpoint(tmp_path / "m", tensors)
    reader = CheckpointReader(out)
    for name, expected in tensors.items():
        reader.get(name).add_(1)
        assert torch.equal(reader.get(name), expected)
        assert torch.equal(CheckpointReader(out).get(name), expected)


def test_reading_falls_back_to_copies_when_the_process_runs_out_of_mappings(tmp_path, monkeypatch):
    big = {"big": torch.randn(512, 1024)}
    reader = CheckpointReader(write_checkpoint(tmp_path / "m", big))

    def out_of_mappings(*args, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", out_of_mappings)
    assert torch.equal(reader.get("big"), big["big"])


def test_misaligned_tensors_are_read_into_aligned_memory(tmp_path):
    """Other writers may not align data; kernels get aligned memory anyway."""
    values = torch.randn(2**19)
    header = json.dumps({"flag": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                         "values": {"dtype": "F32", "shape": [2**19], "data_offsets": [1, 1 + 2**21]}}).encode()
    header += b" " * (-len(header) % 8)
    (tmp_path / "config.json").write_text("{}")
    data = values.view(torch.uint8).numpy().tobytes()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\x07" + data)
    reader = CheckpointReader(tmp_path)
    got = reader.get("values")
    assert got.data_ptr() % 4 == 0
    assert torch.equal(got, values)
    assert reader.get("flag").tolist() == [7]


def test_reader_reads_a_plain_safetensors_file_written_by_safetensors(tmp_path):
    save_file({k: v.contiguous() for k, v in MIXED.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    reader = CheckpointReader(tmp_path)
    assert_same_tensors({name: reader.get(name) for name in reader.names}, MIXED)


def save_pickled(path, shards):
    """shards: file name -> tensors; writes an index when there is more than one file."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    for file, tensors in shards.items():
        torch.save(tensors, path / file)
    if len(shards) > 1:
        weight_map = {name: file for file, tensors in shards.items() for name in tensors}
        (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def test_pickled_checkpoints_need_allow_pickle(tmp_path):
    path = save_pickled(tmp_path / "m", {"pytorch_model.bin": MIXED})
    with pytest.raises(EvomergeError, match="--allow-pickle") as error:
        CheckpointReader(path)
    assert str(path) in str(error.value)


def test_single_pickled_checkpoint_is_read_with_allow_pickle(tmp_path):
    reader = CheckpointReader(save_pickled(tmp_path / "m", {"pytorch_model.bin": MIXED}), allow_pickle=True)
    assert set(reader.names) == set(MIXED)
    assert reader.dtype("layers.0.bias") == torch.float16
    assert_same_tensors({name: reader.get(name) for name in reader.names}, MIXED)


def test_sharded_pickled_checkpoint_loads_a_shard_only_when_asked(tmp_path):
    names = list(MIXED)
    shards = {"pytorch_model-00001-of-00002.bin": {n: MIXED[n] for n in names[:3]},
              "pytorch_model-00002-of-00002.bin": {n: MIXED[n] for n in names[3:]}}
    path = save_pickled(tmp_path / "m", shards)
    reader = CheckpointReader(path, allow_pickle=True)
    os.remove(path / "pytorch_model-00002-of-00002.bin")  # never needed below
    assert set(reader.names) == set(MIXED)
    assert reader.shape(names[0]) == MIXED[names[0]].shape
    assert torch.equal(reader.get(names[1]), MIXED[names[1]])


def test_in_place_changes_to_a_pickled_tensor_do_not_reach_later_reads(tmp_path):
    reader = CheckpointReader(save_pickled(tmp_path / "m", {"pytorch_model.bin": MIXED}), allow_pickle=True)
    reader.get("layers.0.weight").add_(1)
    assert torch.equal(reader.get("layers.0.weight"), MIXED["layers.0.weight"])


def test_pickles_with_arbitrary_objects_are_refused(tmp_path):
    path = save_pickled(tmp_path / "m", {"pytorch_model.bin": {"w": torch.zeros(2), "obj": threading.Event}})
    with pytest.raises(EvomergeError, match="cannot load pytorch_model.bin safely"):
        CheckpointReader(path, allow_pickle=True)


def test_safetensors_are_preferred_over_pickles_like_mergekit(tmp_path):
    path = save_pickled(tmp_path / "m", {"pytorch_model.bin": {"old": torch.zeros(1)}})
    write_checkpoint(path, MIXED)
    assert set(CheckpointReader(path).names) == set(MIXED)


def checkpoint_missing_config(tmp_path):
    path = write_checkpoint(tmp_path / "m", MIXED)
    os.remove(path / "config.json")
    return path, "config.json not found"


def checkpoint_with_broken_config(tmp_path):
    path = write_checkpoint(tmp_path / "m", MIXED)
    (path / "config.json").write_text("{not json")
    return path, "config.json is not valid JSON"


def checkpoint_missing_shard(tmp_path):
    path = write_checkpoint(tmp_path / "m", MIXED, max_shard_bytes=100)
    os.remove(path / "model-00002-of-00003.safetensors")
    return path, "shard model-00002-of-00003.safetensors named in model.safetensors.index.json not found"


def checkpoint_without_weights(tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path, "no weights found"


def checkpoint_truncated(tmp_path):
    path = write_checkpoint(tmp_path / "m", MIXED)
    with open(path / "model.safetensors", "r+b") as handle:
        handle.truncate(os.path.getsize(path / "model.safetensors") - 4)
    return path, "model.safetensors is truncated"


def checkpoint_not_safetensors(tmp_path):
    path = write_checkpoint(tmp_path / "m", MIXED)
    (path / "model.safetensors").write_bytes(b"<html>not a model</html>")
    return path, "model.safetensors is not a safetensors file"


def checkpoint_with_inconsistent_header(tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    return path, "tensor 'w' has offsets that do not match its shape and dtype"


def missing_directory(tmp_path):
    return tmp_path / "nowhere", "directory not found"


@pytest.mark.parametrize("make_broken", [
    missing_directory, checkpoint_missing_config, checkpoint_with_broken_config, checkpoint_missing_shard,
    checkpoint_without_weights, checkpoint_truncated, checkpoint_not_safetensors,
    checkpoint_with_inconsistent_header,
])
def test_broken_checkpoints_fail_with_one_line_naming_model_and_file(tmp_path, make_broken):
    path, message = make_broken(tmp_path)
    with pytest.raises(EvomergeError) as error:
        CheckpointReader(path)
    assert str(error.value).startswith(f"model {path}: ")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_asking_for_an_unknown_tensor_names_the_model(tmp_path):
    path = write_checkpoint(tmp_path / "m", MIXED)
    with pytest.raises(EvomergeError, match=f"model {path}: no tensor named 'lm_head.weight'"):
        CheckpointReader(path).get("lm_head.weight")


# --------------------------------------------------------------------------------------------- atomic output


def test_output_appears_only_when_the_block_completes(tmp_path):
    out = tmp_path / "merged"
    with atomic_output_dir(out, force=False) as staging:
        (staging / "model.safetensors").write_text("data")
        assert not out.exists()
    assert (out / "model.safetensors").read_text() == "data"
    assert os.listdir(tmp_path) == ["merged"]


def test_existing_output_is_refused_before_the_block_runs(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(EvomergeError, match=f"output {out} already exists"):
        with atomic_output_dir(out, force=False):
            pytest.fail("the block must not run")
    assert (out / "keep").read_text() == "x"


def test_an_empty_existing_output_dir_is_fine_without_force(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    with atomic_output_dir(out, force=False) as staging:
        (staging / "f").write_text("new")
    assert os.listdir(out) == ["f"]


def test_force_replaces_the_old_output(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old").write_text("x")
    with atomic_output_dir(out, force=True) as staging:
        (staging / "new").write_text("y")
    assert os.listdir(out) == ["new"]
    assert os.listdir(tmp_path) == ["merged"]


@pytest.mark.parametrize("interruption", [RuntimeError("engine crashed"), KeyboardInterrupt()])
def test_a_failure_mid_write_leaves_no_output_and_no_debris(tmp_path, interruption):
    out = tmp_path / "merged"
    with pytest.raises(type(interruption)):
        with atomic_output_dir(out, force=False) as staging:
            writer = ShardedWriter(staging, layout_of(MIXED), max_shard_bytes=100)
            writer.write("embed.weight", MIXED["embed.weight"])
            raise interruption
    assert os.listdir(tmp_path) == []


def test_a_failed_forced_run_keeps_the_previous_output(tmp_path):
    out = write_checkpoint(tmp_path / "merged", MIXED)
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, force=True) as staging:
            with ShardedWriter(staging, layout_of(MIXED), max_shard_bytes=0) as writer:
                writer.write("scale", torch.tensor(1.0))
                raise RuntimeError("engine crashed")
    assert os.listdir(tmp_path) == ["merged"]
    assert_same_tensors(read_all_with_safetensors(out), MIXED)
