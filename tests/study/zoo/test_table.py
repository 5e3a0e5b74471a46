"""`sharpfast manifest --table`: a zoo from a table of the user's own models, dict inputs sliced
into m-batches by the sweep, bad rows refused with their row and column."""
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sharpfast.study.zoo.checkpoints import Manifest, load_model
from sharpfast.study.cli import main
from sharpfast.study.definitions import Definition
from sharpfast.study.store import Store
from sharpfast.study.sweep import run_sweep
from sharpfast.study.zoo.table import TableError, manifest_from_table


class KeywordClassifier(nn.Module):
    """Takes keyword inputs, as Hugging Face models do: ``model(input_ids=..., attention_mask=...)``."""

    def __init__(self, vocab: int = 12, dim: int = 8, n_classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids) * attention_mask[..., None]
        return self.head(h.sum(1) / attention_mask.sum(1, keepdim=True))


def keyword_data(n_examples: int, seed: int = 0):
    """Token sequences whose class is their first token mod 3, as keyword inputs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 12, (n_examples, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[:, 4:] = torch.randint(0, 2, (n_examples, 2), generator=g)
    return {"input_ids": ids, "attention_mask": mask}, ids[:, 0] % 3


def write_zoo(tmp_path, n=3):
    lines = ["id,checkpoint,factory,factory_kwargs,init_checkpoint,hp_lr,hp_opt,test_error,train_error,ood_error"]
    for i in range(n):
        torch.manual_seed(i)
        model = KeywordClassifier()
        save_file(model.state_dict(), str(tmp_path / f"init{i}.safetensors"))
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.0 + i)
        save_file(model.state_dict(), str(tmp_path / f"m{i}.safetensors"))
        lines.append(f'm{i},m{i}.safetensors,tests.study.zoo.test_table:KeywordClassifier,"{{""dim"": 8}}",init{i}.safetensors,'
                     f'{0.1 * (i + 1):g},"sgd",{0.2 + 0.1 * i:.2f},{0.05 * i:.2f},{0.3 + 0.1 * i:.2f}')
    (tmp_path / "models.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "models.csv"


def test_a_table_becomes_a_manifest_that_sweeps(tmp_path, capsys):
    table = write_zoo(tmp_path)
    out = tmp_path / "zoo"
    assert main(["manifest", "--table", str(table), "--data", "tests.study.zoo.test_table:keyword_data",
                 "--data-kwargs", '{"seed": 1}', "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    m = Manifest.load(str(out))
    assert [e.id for e in m.models] == ["m0", "m1", "m2"]
    e = m.models[1]
    assert e.hparams == {"lr": 0.2, "opt": "sgd"} and e.metrics == {"test_error": 0.3, "train_error": 0.05,
                                                                    "ood_error": 0.4, "gap": pytest.approx(0.25)}
    assert e.kwargs == {"dim": 8} and len(e.sha256) == 64 and e.init_sha256
    model, init = load_model(m, e), load_model(m, e, initial=True)
    assert torch.allclose(model.head.weight, 2 * init.head.weight)
    assert m.data == {"factory": "tests.study.zoo.test_table:keyword_data", "kwargs": {"seed": 1}}
    # dict inputs are sliced into m-batches: each batch gets its own rows of every key
    defs = [Definition.from_dict(dict(kind="max", norm="linf", rho=0.01, n_iters=3, m=32, n_examples=64)),
            Definition.from_dict(dict(kind="avg", norm="l2", rho=0.05, n_samples=3, m=32, n_examples=64))]
    store = str(tmp_path / "r.db")
    s = run_sweep(m, defs, store, progress=False)
    assert (s.ok, s.errors) == (6, 0)
    import sharpfast
    x, y = keyword_data(64, seed=1)
    batches = [({k: v[i:i + 32] for k, v in x.items()}, y[i:i + 32]) for i in (0, 32)]
    want = sharpfast.evaluate_sharpness(model, batches, defs[0].settings()).sharpness
    with Store(store, readonly=True) as st:
        rows = {(r.checkpoint_id, r.definition_key): r for r in st.rows()}
    assert rows[("m1", defs[0].key)].value == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("m1,m1.safetensors", "m0,m1.safetensors"), "row 3.*appears twice"),
    (lambda t: t.replace("m2.safetensors,", "m2.pt,"), "row 4.*not a .safetensors file"),
    (lambda t: t.replace("m1.safetensors,", "missing.safetensors,"), "row 3.*column 'checkpoint'.*does not exist"),
    (lambda t: t.replace(',0.30,0.05,', ',high,0.05,'), "row 3.*column 'test_error'.*must be a number"),
    (lambda t: t.replace('tests.study.zoo.test_table:KeywordClassifier,"{""dim"": 8}",init1',
                         'tests.study.zoo.test_table:KeywordClassifier,"{dim}",init1'), "row 3.*factory_kwargs.*not JSON"),
    (lambda t: t.replace("id,checkpoint", "name,checkpoint"), "needs an 'id' column"),
])
def test_bad_rows_are_named_by_row_and_column(tmp_path, edit, message):
    table = write_zoo(tmp_path)
    table.write_text(edit(table.read_text()))
    with pytest.raises(TableError, match=message):
        manifest_from_table(str(table), "tests.study.zoo.test_table:keyword_data")


def test_bad_data_factory_and_cli_exit_code(tmp_path, capsys):
    table = write_zoo(tmp_path, n=1)
    with pytest.raises(TableError, match="package.module:function"):
        manifest_from_table(str(table), "keyword_data")
    assert main(["manifest", "--table", str(table), "--data", "tests.study.zoo.test_table:keyword_data", "--data-kwargs",
                 "[1", "--out", str(tmp_path / "z")]) == 2
    assert "--data-kwargs is not JSON" in capsys.readouterr().err


def test_hugging_face_models_from_save_pretrained_folders(tmp_path):
    """The README's worked example, smaller: tiny BERTs built from a config, fine-tuned, saved with
    save_pretrained, listed by hf_folder, swept (dict inputs) and reported; no hub is reached."""
    pytest.importorskip("transformers")
    import sharpfast
    from sharpfast.study.experiments import bert_example
    table = bert_example.build(str(tmp_path), epochs=1, grid=bert_example.GRID[:2])
    # the factory's name before the experiments moved into sharpfast.study.experiments: still loads
    m = manifest_from_table(table, "sharpfast.study.bert_example:data")
    entry = m.models[0]
    assert entry.factory == "sharpfast.study.hf:from_folder" and entry.checkpoint.endswith("model.safetensors")
    assert entry.hparams == {"lr": 0.0003, "seed": 0} and {"test_error", "ood_error", "gap"} <= set(entry.metrics)
    model = load_model(m, entry)
    x, y = bert_example.data(64)
    assert bert_example.error(model, x, y) == pytest.approx(entry.metrics["train_error"], abs=0.1)
    d = Definition.from_dict(dict(kind="max", norm="linf", rho=0.0005, normalize_logits="norm", n_iters=3, m=32,
                                  n_examples=64))
    store = str(tmp_path / "r.db")
    assert run_sweep(m, [d], store, progress=False).ok == 2
    batches = [({k: v[i:i + 32] for k, v in x.items()}, y[i:i + 32]) for i in (0, 32)]
    want = sharpfast.evaluate_sharpness(model, batches, d.settings()).sharpness
    with Store(store, readonly=True) as st:
        got = {r.checkpoint_id: r.value for r in st.rows()}
    assert got[entry.id] == pytest.approx(want, rel=1e-6)
    from sharpfast.study.analysis.report import build_report
    assert "max-linf-adaptive-lognorm m=32 n_examples=64 n_iters=3 rho=0.0005" in build_report(
        store, None, plots=False).markdown()
    # a folder without save_pretrained's files is refused by row and column
    (tmp_path / "models.csv").write_text(open(table).read().replace("bert-lr0.0003-s0,bert-lr0.0003-s0",
                                                                    "bert-lr0.0003-s0,nowhere"))
    with pytest.raises(TableError, match="row 2.*hf_folder.*no config.json"):
        manifest_from_table(str(tmp_path / "models.csv"), "sharpfast.study.experiments.bert_example:data")
