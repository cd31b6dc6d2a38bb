"""The official eval's scores: answer EM, CoT EM, tokens per answer, thoughts used."""
from coconut_engine.metrics import GenerationScore, extract_cot, score_generation, summarize
from coconut_engine.trainer import Trainer
from test_trainer import tiny

STEPS = ("Tom is a yumpus.", "Every yumpus is a wumpus.")


def test_answer_and_cot_exact_match():
    text = "Tom is a yumpus.\nEvery yumpus is a wumpus.\n### Tom is a wumpus."
    assert score_generation(text, "Tom is a wumpus.", STEPS, 12, 0) == GenerationScore(True, True, 12, 0)
    wrong_step = "Tom is a yumpus.\nEvery yumpus is a zumpus.\n### Tom is a wumpus."
    assert score_generation(wrong_step, "Tom is a wumpus.", STEPS, 12, 0) == GenerationScore(True, False, 12, 0)
    # Coconut at stage 1: the first step became a thought, the model writes the rest
    partial = score_generation("Every yumpus is a wumpus.\n### Tom is a wumpus.", "Tom is a wumpus.", STEPS, 9, 1)
    assert (partial.answer_correct, partial.cot_correct) == (True, False)
    assert score_generation("### 1,234", "1,234", (), 3, 0).answer_correct  # commas dropped on both sides
    assert score_generation("### 12", "1,234", (), 3, 0).cot_correct  # no steps: the empty CoT matches
    assert extract_cot("<|end-latent|>a\nb\n### c") == "a\nb"
    summary = summarize([GenerationScore(True, True, 10, 0), GenerationScore(False, True, 20, 2)])
    assert summary == {"accuracy": 0.5, "cot_accuracy": 1.0, "tokens_per_answer": 15.0, "thoughts_per_answer": 1.0}


def test_trainer_metrics_carry_the_official_scores(tmp_path):
    trainer = Trainer(tiny(tmp_path, num_epochs=1, max_eval_questions=4))
    m = trainer.run()[-1]
    assert {"accuracy", "cot_accuracy", "tokens_per_answer", "thoughts_per_answer"} <= set(m)
    for g, rec in zip(trainer.last_generations, trainer.val_records):
        assert g["cot_correct"] == (extract_cot(g["output"]) == "\n".join(rec.steps))
