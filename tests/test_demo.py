"""The demo's synthetic languages and a tiny end-to-end run (seconds)."""
import csv
import math

import pytest
import torch

from fastmtt.apps.demo import config_for, draw_frontier, make_languages, run_demo

pytest.importorskip("peft")
pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: on a shared 2-core machine, two OpenMP threads mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_languages_shift_mass_onto_new_successors():
    base, target = make_languages(vocab_size=50, branching=4, smoothing=0.05, shift=0.6, seed=1)
    torch.testing.assert_close(base.transition.sum(1), torch.ones(50))
    torch.testing.assert_close(target.transition.sum(1), torch.ones(50))
    likely = base.transition > 0.05 / 50 + 1e-6
    assert torch.all(likely.sum(1) == 4)  # real preferences among a few successors
    new = (target.transition - 0.4 * base.transition).argmax(1)
    assert torch.all(target.transition[torch.arange(50), new] >= 0.6)
    assert not likely[torch.arange(50), new].any()  # the new successor is one the base rarely produces
    assert 0.5 < base.entropy() < math.log(50) and target.entropy() < base.entropy() + 1.0

    tokens = target.sample(400, 30, torch.Generator().manual_seed(0))
    previous, following = tokens[:, :-1].reshape(-1), tokens[:, 1:].reshape(-1)
    took_new = (following == new[previous]).float().mean()
    assert abs(float(took_new) - 0.6) < 0.03


def test_tiny_run_learns_and_measures_forgetting(tmp_path, capsys):
    cfg = config_for("tiny", finetune_lr=1e-2)
    lines = []
    rows = run_demo(cfg, out_dir=str(tmp_path), progress=True, log=lines.append)
    assert capsys.readouterr().err == ""  # stderr is not a terminal here: no progress bars
    base, ce_only, kl, mtt = rows
    assert [r["method"] for r in rows] == ["base model", "ce", "kl", "mtt"]
    assert base["base_kl"] == 0.0 and base["base_ppl_increase"] == 0.0
    assert ce_only["target_ce"] < base["target_ce"] - 0.05  # the adapter learned the target language
    assert ce_only["base_kl"] > 1e-3 and ce_only["base_ppl_increase"] > 0  # and forgot some of the base
    assert kl["base_kl"] < ce_only["base_kl"]  # the full-KL anchor limits forgetting
    assert all(math.isfinite(r[key]) for r in rows for key in ("target_ce", "target_acc", "base_ppl", "base_kl"))
    assert any(line.startswith("| mtt |") for line in "\n".join(lines).splitlines())
    with open(tmp_path / "results.csv") as handle:
        written = list(csv.DictReader(handle))
    assert float(written[3]["base_kl"]) == pytest.approx(mtt["base_kl"])
    assert (tmp_path / "frontier.png").stat().st_size > 1000


def test_frontier_plot_labels_and_range():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row = lambda method, lam, target_ce, base_kl, direction="": dict(  # noqa: E731
        method=method, lam=lam, target_ce=target_ce, base_kl=base_kl, direction=direction)
    rows = [row("base model", float("nan"), 7.2, 0.0), row("ce", 0.0, 1.25, 2.7), row("kl", 1.0, 1.7, 0.69),
            row("kl", 3.0, 2.4, 0.28), row("mtt", 1.0, 1.45, 0.87, "forward"), row("mtt", 3.0, 2.0, 0.39, "forward")]
    fig, ax = plt.subplots()
    draw_frontier(rows, ax, config_for("quick"))
    fig.canvas.draw()
    texts = [t.get_text() for t in ax.texts]
    assert {"\u03bb=1", "\u03bb=3"} <= set(texts) and not any("labels" in t for t in texts + [ax.get_title()])
    assert any("better" in t and "\u2199" in t for t in texts)  # lower left is better
    assert any("7.20" in t for t in texts)  # the base model is a note ...
    low, high = ax.get_ylim()
    assert high < 3.0 and low < 1.25  # ... and does not stretch the y axis to 7.2
    assert [line.get_label() for line in ax.get_lines()] == ["CE + full KL", "CE + MTT (forward)"]
    plt.close(fig)


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        config_for("huge")
