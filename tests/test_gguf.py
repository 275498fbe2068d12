"""GGUF models as input: a GGUF file made here loads, runs the pipeline at lr=0 and exports the dequantized model;
without the packages, or for an architecture transformers cannot read, one line says so before any work."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from gguf_writer import write_tiny_llama_gguf
from helpers import one_line_error, run_cli
from pipeline_setup import pipeline_config, write_config
from segprop_ray.config import validate_config
from segprop_ray.demo.corpus import generate_corpus, write_jsonl


@pytest.fixture
def gguf_file(tmp_path):
    return write_tiny_llama_gguf(tmp_path / "tiny-llama.Q8_0.gguf")


def corpus(tmp_path):
    return (write_jsonl(generate_corpus(60, seed=0), tmp_path / "data" / "train.jsonl"),
            write_jsonl(generate_corpus(10, seed=1), tmp_path / "data" / "eval.jsonl"))


@pytest.mark.slow
def test_a_gguf_model_runs_at_lr0_and_exports_the_dequantized_model(local_ray, tmp_path, gguf_file, monkeypatch):
    from segprop_ray.pipeline.driver import Driver

    monkeypatch.setenv("SEGPROP_CACHE", str(tmp_path / "cache"))
    train, evaluation = corpus(tmp_path)
    run_dir = (tmp_path / "run").as_uri()
    cfg = validate_config(pipeline_config(run_dir, str(gguf_file), str(train), str(evaluation),
                                          training={"learning_rate": 0.0, "max_steps": 2}))
    manifest = Driver(cfg).run()
    assert manifest.state == "done" and manifest.steps["stage_model"].status == "done"
    staged = tmp_path / "run" / "model"
    assert (staged / "model.safetensors").is_file() and (staged / "tokenizer.json").is_file()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export" / f"exit-{manifest.final_depth}")
    dequantized = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    ids = torch.randint(0, dequantized.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, dequantized(ids).logits, rtol=0, atol=0)
    assert exported.config.tie_word_embeddings is False  # a Stage 2 exit: its head trained apart (here at lr 0)


def test_without_the_gguf_packages_the_run_stops_in_one_line(tmp_path, gguf_file, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    train, evaluation = corpus(tmp_path)
    config = write_config(tmp_path / "c.yaml", pipeline_config(str(tmp_path / "run"), str(gguf_file), str(train),
                                                               str(evaluation)))
    capsys.readouterr()
    code, _, err = run_cli(capsys, "run", str(config))
    assert code == 2 and "is a GGUF file, which needs gguf: pip install 'segprop_ray[gguf]'" in one_line_error(err)
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_an_architecture_transformers_cannot_read_is_named(tmp_path, capsys, monkeypatch):
    import gguf

    monkeypatch.setenv("SEGPROP_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "notamodel")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    train, evaluation = corpus(tmp_path)
    config = write_config(tmp_path / "c.yaml", pipeline_config(str(tmp_path / "run"), str(path), str(train),
                                                               str(evaluation)))
    capsys.readouterr()
    code, _, err = run_cli(capsys, "run", str(config))
    line = one_line_error(err)
    assert code == 2 and f"model {path}: transformers cannot load this GGUF file" in line
