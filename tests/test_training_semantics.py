"""Official training semantics (facebookresearch/coconut run.py): dropout from the model config in
training only, a fresh optimizer per epoch, the eval thought cap and generation budget, the lr
schedule, seed reproducibility."""
import math

import pytest
import torch

from coconut_engine.coconut import MODES, CoconutModel, CoconutSample, SpecialTokens
from coconut_engine.config import ModelConfig
from coconut_engine.data import Record, StageRules, eval_prompt, tokenize_record
from coconut_engine.loader import load_model
from coconut_engine.schedule import LRSchedule
from coconut_engine.trainer import TrainConfig, Trainer, TrainingError
from test_data import TOKENS as DATA_TOKENS, WordTokenizer
from test_trainer import tiny, weights
from tiny_models import build_hf_model

TOKENS = SpecialTokens(bot=150, thought=151, eot=152)


def samples():
    return [CoconutSample([3, 4, 5, 6, TOKENS.bot], 2, [TOKENS.eot, 7, 8, 9]),
            CoconutSample([10, 11, TOKENS.bot], 1, [TOKENS.eot, 12, 13]),
            CoconutSample([14, 15, 16], 0, [17, 18, 19, 20])]


def test_dropout_rates_come_from_the_model_config():
    gpt2 = ModelConfig.from_dict({"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2, "vocab_size": 10,
                                  "n_positions": 8, "embd_pdrop": 0.1, "resid_pdrop": 0.2, "attn_pdrop": 0.3})
    assert (gpt2.embd_dropout, gpt2.resid_dropout, gpt2.attn_dropout) == (0.1, 0.2, 0.3)
    llama = ModelConfig.from_dict({"model_type": "llama", "hidden_size": 8, "intermediate_size": 16,
                                   "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 10,
                                   "attention_dropout": 0.25})
    assert (llama.embd_dropout, llama.resid_dropout, llama.attn_dropout) == (0.0, 0.0, 0.25)
    from coconut_engine.errors import ConfigError
    with pytest.raises(ConfigError, match="resid_pdrop=1.5"):
        ModelConfig.from_dict({"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2, "vocab_size": 10,
                               "n_positions": 8, "resid_pdrop": 1.5})


def test_dropout_applies_in_training_mode_in_every_forward_mode(tmp_path):
    build_hf_model("gpt2", tmp_path / "m", embd_pdrop=0.3, resid_pdrop=0.3)
    decoder = load_model(tmp_path / "m", attention_backend="torch")
    assert not decoder.training  # loaded for inference, as transformers' from_pretrained
    coconut = CoconutModel(decoder, TOKENS)
    with torch.no_grad():
        clean = {mode: float(coconut(samples(), mode=mode)) for mode in MODES}
    assert max(clean.values()) - min(clean.values()) < 1e-4  # eval mode: no dropout, the modes agree
    decoder.train()
    for mode in MODES:
        losses = []
        for _ in range(2):
            torch.manual_seed(3)
            loss = coconut(samples(), mode=mode)
            loss.backward()
            losses.append(loss.detach().item())
        assert abs(losses[0] - clean[mode]) > 1e-3, mode  # masks applied ...
        assert losses[0] == losses[1], mode  # ... drawn from the seeded generator
    with torch.no_grad():  # generation: train mode but no gradients -> no dropout
        assert abs(float(coconut(samples(), mode="paged")) - clean["paged"]) < 1e-5


def test_trainer_dropout_key_and_eval_mode(tmp_path):
    trainer = Trainer(tiny(tmp_path, num_epochs=1, dropout=0.2))
    assert (trainer.decoder.dropout.embd, trainer.decoder.dropout.resid) == (0.2, 0.2)
    seen = []
    forward = trainer.decoder.forward

    def record_mode(*args, **kwargs):
        seen.append((trainer.decoder.training, torch.is_grad_enabled()))
        return forward(*args, **kwargs)

    trainer.decoder.forward = record_mode
    trainer.run()
    assert (True, True) in seen  # training steps drop
    assert all(not training for training, grad in seen if not grad)  # eval, val loss: eval mode
    assert trainer.decoder.training  # back to training after evaluation
    with pytest.raises(TrainingError, match="dropout"):
        tiny(tmp_path, dropout=1.0)


def test_reset_optimizer_every_epoch_as_official_or_per_stage(tmp_path):
    trainer = Trainer(tiny(tmp_path, num_epochs=5, epochs_per_stage=2))  # stages 0 0 1 1 2
    assert trainer.cfg.reset_optimizer is True
    assert [trainer._resets_optimizer_at(e) for e in range(5)] == [False, True, True, True, True]
    trainer.cfg.reset_optimizer = "stage"
    assert [trainer._resets_optimizer_at(e) for e in range(5)] == [False, False, True, False, True]
    trainer.cfg.reset_optimizer = False
    assert not any(trainer._resets_optimizer_at(e) for e in range(5))
    assert tiny(tmp_path, reset_optimizer="stage").reset_optimizer == "stage"
    assert TrainConfig.from_dict({"reset_optimizer": "false"}).reset_optimizer is False
    assert TrainConfig.from_dict({"reset_optimizer": "epoch"}).reset_optimizer is True
    with pytest.raises(TrainingError, match="reset_optimizer"):
        TrainConfig.from_dict({"reset_optimizer": "sometimes"})


def test_eval_thoughts_capped_at_the_steps_without_pad_latent_to_max():
    rec = tokenize_record(Record("Is Tom a wumpus?", ("Tom is a yumpus.", "Every yumpus is a wumpus."), "yes"),
                          WordTokenizer())
    assert eval_prompt(rec, 3, StageRules(max_latent_stage=6), DATA_TOKENS)[1] == 2  # 2 steps, stage 3
    assert eval_prompt(rec, 3, StageRules(max_latent_stage=6, pad_latent_to_max=True), DATA_TOKENS)[1] == 3
    assert eval_prompt(rec, 3, StageRules(max_latent_stage=1, pad_latent_to_max=True), DATA_TOKENS)[1] == 1
    assert eval_prompt(rec, 3, StageRules(max_latent_stage=6, c_thought=2), DATA_TOKENS)[1] == 4
    assert eval_prompt(rec, 3, StageRules(mode="no_thoughts"), DATA_TOKENS)[1] == 0
    # the official generation budget: 64 for GSM8K, 128 otherwise, unless set
    assert TrainConfig(train_path="d/gsm_train.json", val_path="d/gsm_valid.json").max_new_tokens() == 64
    assert TrainConfig(train_path="d/prosqa_train.json", val_path="d/prosqa_valid.json").max_new_tokens() == 128
    assert TrainConfig(eval_max_new_tokens=7).max_new_tokens() == 7


def test_lr_schedules():
    constant = LRSchedule("constant", 1e-3, total_steps=10)
    assert [constant.lr_at(s) for s in (0, 5, 9)] == [1e-3] * 3
    cosine = LRSchedule("cosine", 1e-3, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert cosine.lr_at(0) == pytest.approx(5e-4) and cosine.lr_at(1) == pytest.approx(1e-3)
    assert cosine.lr_at(6) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine.lr_at(10) == pytest.approx(1e-4) and cosine.lr_at(50) == pytest.approx(1e-4)
    with pytest.raises(TrainingError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")


def test_trainer_follows_the_cosine_schedule_across_optimizer_resets(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, num_epochs=2, lr_schedule="cosine", warmup_steps=2, max_eval_questions=2)
    trainer = Trainer(cfg)
    lrs = []
    step = torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    trainer.run()
    total = 2 * math.ceil(len(trainer.train_tok) / cfg.batch_size)
    assert lrs == [cfg.lr_scheduler(total).lr_at(s) for s in range(total)]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[1]


def test_same_seed_same_weights_with_dropout_also_after_resume(tmp_path, monkeypatch):
    run = dict(num_epochs=2, dropout=0.3, max_eval_questions=2)
    a = Trainer(tiny(tmp_path, "a", **run))
    a.run()
    b = Trainer(tiny(tmp_path, "b", **run))
    b.run()
    wa, wb = weights(a.decoder), weights(b.decoder)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    c = Trainer(tiny(tmp_path, "c", seed=1, **run))
    c.run()
    wc = weights(c.decoder)
    assert not all(torch.equal(wa[n], wc[n]) for n in wa)
    # killed after the first epoch and resumed in a fresh Trainer (whose set-up consumed random numbers)
    killed = Trainer(tiny(tmp_path, "d", **{**run, "num_epochs": 1}))
    killed.run()
    torch.rand(1000)
    resumed = Trainer(tiny(tmp_path, "d", resume=True, **run))
    resumed.run()
    wd = weights(resumed.decoder)
    assert all(torch.equal(wa[n], wd[n]) for n in wa)
