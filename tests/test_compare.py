import json
import math

from conftest import TINY_RECIPE, lmkit

from toolkit import compare as ev

A = [3.0, 3.2, 3.1]
B = [2.9, 3.0, 3.05]
T975_DF2 = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))  # the t quantile for 2 degrees of freedom, in closed form


def t2_two_sided_p(t: float) -> float:
    return 1 - abs(t) / math.sqrt(t * t + 2)  # Student t with 2 degrees of freedom, in closed form


def test_t_interval_equals_a_hand_computation():
    mean, ci = ev.t_interval(A)
    sd = math.sqrt(((3.0 - 3.1) ** 2 + (3.2 - 3.1) ** 2 + 0) / 2)  # 0.1
    assert math.isclose(mean, 3.1) and math.isclose(ci, T975_DF2 * sd / math.sqrt(3), rel_tol=1e-9)
    assert math.isclose(T975_DF2, 4.3026527297, rel_tol=1e-10)
    assert math.isnan(ev.t_interval([3.0])[1])


def test_paired_difference_equals_a_hand_computation():
    d = [b - a for a, b in zip(A, B)]  # -0.1, -0.2, -0.05
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    se = sd / math.sqrt(3)
    res = ev.difference_test(A, B, paired=True)
    assert res["test"] == "paired t" and res["df"] == 2
    assert math.isclose(res["diff"], -0.11666666666666667, rel_tol=1e-9)
    assert math.isclose(res["t"], mean / se, rel_tol=1e-9) and math.isclose(res["t"], -2.6457513110645906, rel_tol=1e-9)
    assert math.isclose(res["ci"], T975_DF2 * se, rel_tol=1e-9)
    assert math.isclose(res["p"], t2_two_sided_p(mean / se), rel_tol=1e-9)
    assert math.isclose(res["p"], 0.1180828963, rel_tol=1e-6)


def test_welch_difference_equals_a_hand_computation():
    va, vb = 0.01 / 3, (sum((x - 2.9833333333) ** 2 for x in B) / 2) / 3
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    res = ev.difference_test(A, B, paired=False)
    assert res["test"] == "Welch t"
    assert math.isclose(res["t"], (sum(B) - sum(A)) / 3 / se, rel_tol=1e-6)
    assert math.isclose(res["df"], df, rel_tol=1e-6) and math.isclose(res["df"], 3.7409326, rel_tol=1e-6)
    assert math.isclose(res["p"], 0.18845105, rel_tol=1e-5)  # scipy.stats.ttest_ind(A, B, equal_var=False)


def test_verdicts():
    assert ev.verdict(ev.difference_test(A, B, paired=True), "base", "res").startswith(
        "difference within seed noise (-0.1167 ± 0.1897 nats, p = 0.118)")
    clear = ev.difference_test([3.0, 3.1, 3.2], [2.5, 2.62, 2.69], paired=True)
    assert ev.verdict(clear, "base", "res") == (f"res better than base by {abs(clear['diff']):.4f} ± "
                                                f"{clear['ci']:.4f} nats (p = {clear['p']:.3g})")
    worse = ev.difference_test([2.5, 2.62, 2.69], [3.0, 3.1, 3.2], paired=True)
    assert ev.verdict(worse, "base", "res").startswith("base better than res by")


def test_summarize_pairs_by_seed_and_falls_back_to_welch():
    def run(seed, loss, name):
        return ev.RunResult(f"{name}_s{seed}", name, seed, 100, 600.0, "h", loss)

    a = [run(s, x, "a") for s, x in enumerate(A)]
    b = [run(s, x, "b") for s, x in reversed(list(enumerate(B)))]  # order does not matter: pairs go by seed
    s = ev.summarize("a", a, "b", b)
    assert s["difference"]["test"] == "paired t" and math.isclose(s["difference"]["p"], 0.1180828963, rel_tol=1e-6)
    assert math.isclose(s["arms"]["a"]["val_loss_ci"], ev.t_interval(A)[1])
    b_other_seeds = [run(s + 10, x, "b") for s, x in enumerate(B)]
    assert ev.summarize("a", a, "b", b_other_seeds)["difference"]["test"] == "Welch t"


def fake_run(path, sha: str, recipe: str):
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"")
    (path / "recipe.toml").write_text("")
    (path / "run.json").write_text(json.dumps({"recipe": recipe, "data": {"val_sha256": sha}}))
    return path


def test_compare_refuses_runs_evaluated_on_different_val_data(capsys, tmp_path):
    a = fake_run(tmp_path / "a_s0", "aaaa", "a")
    b = fake_run(tmp_path / "b_s0", "bbbb", "b")
    code, out, err = lmkit(capsys, "eval", "compare", str(a), "vs", str(b), "--out", str(tmp_path / "rep"))
    assert code == 1
    assert f"runs were evaluated on different val data: {a} (val_sha256 aaaa) vs {b} (bbbb)" in " ".join(
        (out + err).split())
    assert not (tmp_path / "rep").exists()


def test_compare_needs_two_recipes_among_runs(capsys, tmp_path):
    runs = [fake_run(tmp_path / f"{n}_s0", "h", n) for n in ("x", "y", "z")]
    code, out, err = lmkit(capsys, "eval", "compare", *map(str, runs))
    assert code == 1 and "these runs come from 3 recipe(s) (x, y, z)" in " ".join((out + err).split())


GPT2_TINY = TINY_RECIPE.replace('name = "tiny"', 'name = "tinyres"').replace(
    'family = "llama"\ndim = 32\nn_layers = 2\nn_heads = 4\nn_kv_heads = 2\nmultiple_of = 16',
    'family = "gpt2"\ndim = 32\nn_layers = 2\nn_heads = 4\ndropout = 0.0\nresonance = true')


def test_end_to_end_compare_of_two_recipes_writes_the_reports(capsys, tmp_path):
    assert 'family = "gpt2"' in GPT2_TINY
    (tmp_path / "tiny.toml").write_text(TINY_RECIPE)
    (tmp_path / "tinyres.toml").write_text(GPT2_TINY)
    out = tmp_path / "cmp"
    code, stdout, err = lmkit(capsys, "eval", "compare", str(tmp_path / "tiny.toml"), str(tmp_path / "tinyres.toml"),
                              "--seeds", "2", "--budget-tokens", "1536", "--out", str(out), "--batches", "2",
                              "--set", "train.eval_interval=2")
    assert code == 0, stdout + err
    for name in ("tiny_s0", "tiny_s1", "tinyres_s0", "tinyres_s1"):
        info = json.loads((out / name / "run.json").read_text())
        assert info["recipe"] == name.split("_")[0]
        metrics = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert max(m["step"] for m in metrics) == 6  # 1536 tokens / (4 x 2 x 32 tokens per step)
    summary = json.loads((out / "tiny_vs_tinyres.json").read_text())
    assert summary["arms"]["tiny"]["seeds"] == [0, 1] and summary["difference"]["test"] == "paired t"
    losses = [r["loss"] for r in summary["arms"]["tinyres"]["runs"]]
    assert all(0 < x < math.log(259) + 1 for x in losses) and losses[0] != losses[1]  # seeds differ
    assert summary["verdict"] == ev.verdict(ev.difference_test(
        [r["loss"] for r in summary["arms"]["tiny"]["runs"]], losses, paired=True), "tiny", "tinyres")
    md = (out / "tiny_vs_tinyres.md").read_text()
    assert "| tinyres | 2 (0, 1) |" in md and summary["verdict"] in md and "lmkit eval compare" in md
    assert (out / "tiny_vs_tinyres.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "verdict:" in stdout

    # the same runs again, as existing run folders split by recipe name: nothing is retrained, same numbers
    runs = [str(out / n) for n in ("tinyres_s0", "tiny_s0", "tinyres_s1", "tiny_s1")]
    code, stdout, err = lmkit(capsys, "eval", "compare", *runs, "--out", str(tmp_path / "again"), "--json",
                              "--batches", "2")
    assert code == 0, stdout + err
    again = json.loads(stdout)
    assert again["a"] == "tinyres" and again["b"] == "tiny"
    assert math.isclose(again["difference"]["diff"], -summary["difference"]["diff"], rel_tol=1e-9)
