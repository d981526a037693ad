"""The bundled model's post-training command (recipes/glm45-tiny): RL, then the spelling stage from RL's result, in
one wall-time budget; a budget with no room for the second stage is refused before any work."""

import json

import pytest
import torch
from glm45_tiny import spelling_recipe
from glm45_tiny.post_train import main
from safetensors.torch import load_file

from glm45.config import bundled_model_path


def test_post_training_runs_rl_then_spelling_from_its_result(tmp_path, monkeypatch):
    out = tmp_path / "post"
    started_from = []
    real_run = spelling_recipe.run
    monkeypatch.setattr(spelling_recipe, "run", lambda args: started_from.append(args.model) or real_run(args))
    assert main(["--model", str(bundled_model_path()), "--out", str(out), "--rl-steps", "1", "--spelling-steps", "2",
                 "--num-prompts", "8", "--prompts-per-step", "2", "--num-generations", "2",
                 "--num-conversations", "40", "--max-minutes", "10", "--rl-minutes", "5"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rl_model"].startswith(str(out / "rl")) and summary["result"].startswith(str(out / "spelling"))
    spelling = json.loads((out / "spelling" / "summary.json").read_text())
    assert spelling["steps"] == 2 and started_from == [summary["rl_model"]]
    rl, final = (load_file(f"{path}/model.safetensors") for path in (summary["rl_model"], summary["result"]))
    name = "model.embed_tokens.weight"
    assert set(final) == set(rl) and not torch.equal(rl[name], final[name])


def test_a_budget_without_room_for_the_spelling_stage_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--model", str(bundled_model_path()), "--out", str(tmp_path), "--max-minutes", "30",
              "--rl-minutes", "30"])
    assert "leaves no time" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
