"""The `engine` command line."""

from engine.cli import main


def test_generate_streams_the_completion(smollm2_gguf, capsys):
    assert main(["generate", "The capital of France is", "--model", smollm2_gguf,
                 "--max-tokens", "8", "--max-model-len", "64"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The capital of France is") and "Paris" in out


def test_bad_arguments_exit_with_a_message(smollm2_gguf, capsys, tmp_path):
    assert main(["generate", "hi", "--model", str(tmp_path / "missing")]) == 2
    assert "is neither an existing path" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", smollm2_gguf, "--temperature", "-1",
                 "--max-model-len", "64"]) == 2
    assert "SamplingParams.temperature" in capsys.readouterr().err
