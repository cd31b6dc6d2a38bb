"""examples/compare.ipynb runs end to end (every cell; a failing cell fails the test) on a run laid out
as the main job's output (`runs/default/{coconut,no_cot}`), trained here at a tiny scale."""
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from coconut_engine.trainer import Trainer
from test_trainer import tiny

ROOT = Path(__file__).resolve().parents[1]


def test_compare_notebook_runs_on_main_job_output(tmp_path, monkeypatch):
    run = tmp_path / "default"
    coconut = Trainer(tiny(run, "coconut", num_epochs=3, epochs_per_stage=1, max_latent_stage=2,
                           max_eval_questions=4))
    coconut.run()
    data = run / "coconut" / "data"
    Trainer(tiny(run, "no_cot", mode="no_cot", num_epochs=1, max_eval_questions=4, train_path=str(data / "train.json"),
                 val_path=str(data / "val.json"), tokenizer=str(run / "coconut" / "tokenizer"))).run()
    for key, value in {"COCONUT_COMPARE_RUN": str(run), "COCONUT_COMPARE_QUESTIONS": "6",
                       "COCONUT_COMPARE_MAX_NEW_TOKENS": "8", "COCONUT_ATTENTION_BACKEND": "torch",
                       "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(ROOT / "examples" / "compare.ipynb", as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = {i: "".join(o.get("text", "") for o in cell.get("outputs", [])) for i, cell in enumerate(notebook.cells)
               if cell.cell_type == "code"}
    text = "\n".join(outputs.values())
    for row in ("base model (no-CoT prompt)", "no-CoT", "Coconut model, stage 0 (CoT)", "Coconut model, stage 2"):
        assert f"| {row}" in text
    assert "thought 1: " in text and "thought 2: " in text
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for cell in notebook.cells for o in cell.get("outputs", []))
