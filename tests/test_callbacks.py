import numpy as np

from kgpt.model.gpt import build_model
from kgpt.model.saving import save_model
from kgpt.training.callbacks import ResumableEarlyStopping, evaluations_since_best, patience_spent


def test_evaluations_since_best():
    assert evaluations_since_best([]) == 0
    assert evaluations_since_best([3.0]) == 0
    assert evaluations_since_best([3.0, 2.0, 2.5, 2.0]) == 2  # a tie is no improvement
    assert evaluations_since_best([3.0, 2.5, 1.0]) == 0


def _tiny_model():
    model = build_model(dict(vocabulary_size=8, sequence_length=4, num_layers=1, num_heads=1, hidden_dim=4))
    model(np.zeros((1, 4), "int32"))
    return model


def test_resumed_early_stopping_keeps_its_wait_and_restores_the_checkpointed_best(tmp_path):
    best = _tiny_model()
    save_model(best, str(tmp_path / "best.keras"))
    model = _tiny_model()  # other weights: the run's latest
    callback = ResumableEarlyStopping(2, [3.0, 2.0, 2.5], best_path=str(tmp_path / "best.keras"))
    callback.set_model(model)
    callback.on_train_begin()
    assert (callback.best, callback.best_epoch, callback.wait) == (2.0, 1, 1)
    callback.on_epoch_end(3, {"val_loss": 2.6})  # the second evaluation without improvement
    assert model.stop_training
    callback.on_train_end()
    for restored, expected in zip(model.get_weights(), best.get_weights()):
        np.testing.assert_array_equal(restored, expected)


def test_patience_spent_before_the_resume():
    assert patience_spent([3.0, 2.0, 2.5, 2.5], 2)
    assert not patience_spent([3.0, 2.0, 2.5], 2)
    assert not patience_spent([3.0], 1)  # Keras never stops at the first evaluation


def test_sample_text_continues_the_prompt_at_each_evaluation(capsys):
    from kgpt.tokenizers.char import train_characters
    from kgpt.training.callbacks import SampleText

    tokenizer = train_characters(["the cat sat on the mat.\n"])
    model = build_model(
        dict(vocabulary_size=tokenizer.vocabulary_size, sequence_length=16, num_layers=1,
             num_heads=1, hidden_dim=8)
    )
    # A prompt longer than the context keeps its end; the sample goes on past the context.
    callback = SampleText(tokenizer, "the cat sat on the mat", max_new_tokens=40, seed=1)
    callback.set_model(model)
    sample = callback.sample()
    assert sample.startswith("the cat sat on the mat")
    assert 15 < len(sample) - len("the cat sat on the mat") <= 40
    assert callback.sample() == sample  # the same seed at every evaluation
    callback.on_epoch_end(0)
    assert f"--- sample after evaluation 1 ---\n{sample}\n---" in capsys.readouterr().out
