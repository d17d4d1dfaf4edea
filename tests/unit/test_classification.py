"""The classification task kind on tiny real models: a 2-block BERT (a `BertModel` snapshot with no
head, like all-MiniLM-L6-v2; built by tests/tiny.py) and a 1-block Llama whose tokenizer and config
have no pad token (like GPT-2 and Llama), both with tokenizers trained in fixtures. The pipeline's
components in order on them: tests/integration/test_classification_stages.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kubetune.config import DataConfig, LoraSettings, ModelConfig
from kubetune.errors import DataError
from kubetune.modeling import load_base_model, meta_model, prepare_for_training
from kubetune.tasks import get_task
from kubetune.tasks.classification import confusion_matrix, label_order, scores_from
from tiny import NAMES, build_wordpiece_tokenizer, sentiment_rows


def build_tiny_llama_without_pad(path: Path) -> Path:
    """A 1-block Llama causal LM whose tokenizer and config define no pad token."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from tiny import build_tokenizer

    tokenizer = build_tokenizer([row["review"] for row in sentiment_rows(300)], vocab_size=200)
    tokenizer.pad_token = None
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         pad_token_id=None, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return build_tiny_llama_without_pad(tmp_path_factory.mktemp("tiny_llama_nopad") / "model")


@pytest.fixture
def kind():
    return get_task("classification")


def data_cfg(path, **kwargs) -> DataConfig:
    return DataConfig(path=str(path), text_field="review", label_field="score", max_length=32, **kwargs)


def records(labels: list[str]) -> list[dict[str, str]]:
    return [{"text": f"text {i}", "label": label} for i, label in enumerate(labels)]


THREE_CLASS_INFO = {"labels": ["0", "1", "2"], "id2label": NAMES, "label2id": {v: int(k) for k, v in NAMES.items()},
                    "label_counts": {"0": 5, "1": 3, "2": 2}}


# ---- label set, names, schema --------------------------------------------------------------------
def test_kind_contract(kind):
    assert (kind.name, kind.peft_task_type) == ("classification", "SEQ_CLS")
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    assert kind.auto_model_class() is AutoModelForSequenceClassification
    assert isinstance(kind.collator(build_wordpiece_tokenizer(["a b c"])), DataCollatorWithPadding)


def test_labels_sort_numerically_then_alphabetically():
    assert label_order(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert label_order(["pos", "neg", "-1", "0.5", "nan"]) == ["-1", "0.5", "nan", "neg", "pos"]


def test_check_fields_requires_text_and_label(kind, tmp_path):
    rows = [{"review": "nice", "score": "1"}]
    kind.check_fields(rows, data_cfg(tmp_path / "x.tsv"))
    with pytest.raises(DataError, match=r"^data.label_field = 'stars': not a field of the data; fields found: review, score"):
        kind.check_fields(rows, DataConfig(path="x", text_field="review", label_field="stars"))
    with pytest.raises(DataError, match="^data.text_field"):
        kind.check_fields(rows, DataConfig(path="x", text_field="body", label_field="score"))
    with pytest.raises(DataError, match="^data.label_field = 'score': every record has an empty value"):
        kind.check_fields([{"review": "nice", "score": ""}], data_cfg(tmp_path / "x.tsv"))


def test_normalise_keeps_raw_label_strings_and_drops_unusable_rows(kind, tmp_path):
    rows = [{"review": " good\u0085 film ", "score": 1}, {"review": "bad", "score": 0.0}, {"review": "", "score": "1"},
            {"review": "meh", "score": None}]
    assert kind.normalise(rows, data_cfg(tmp_path / "x.json")) == [{"text": "good film", "label": "1"},
                                                                   {"text": "bad", "label": "0"}]


def test_info_names_from_config_then_mapping_file_then_raw(kind, tmp_path):
    train = records(["1", "0", "1", "2", "1"])
    info = kind.info(train, data_cfg(tmp_path / "x.tsv", label_names={"0": "neg", "1": "neu", "2": "pos"}))
    assert info == {"labels": ["0", "1", "2"], "id2label": {"0": "neg", "1": "neu", "2": "pos"},
                    "label2id": {"neg": 0, "neu": 1, "pos": 2}, "label_counts": {"0": 1, "1": 3, "2": 1}}
    (tmp_path / "mapping.txt").write_text("0\tnegative\n1\tneutral\n2\tpositive\n")
    assert kind.info(train, data_cfg(tmp_path / "x.tsv"))["id2label"] == NAMES
    assert kind.info(train, data_cfg(tmp_path))["id2label"] == NAMES  # a data directory holding mapping.txt
    assert kind.info(train, data_cfg(tmp_path / "sub" / "x.tsv"))["id2label"] == {"0": "0", "1": "1", "2": "2"}


def test_info_rejects_unusable_label_sets(kind, tmp_path):
    cfg = data_cfg(tmp_path / "x.tsv")
    with pytest.raises(DataError, match=r"^data.label_field = 'score': the training data holds only the label\(s\) \['1'\]"):
        kind.info(records(["1", "1"]), cfg)
    with pytest.raises(DataError, match="^data.label_field = 'score': 60 distinct labels in 60 training rows"):
        kind.info(records([str(i) for i in range(60)]), cfg)
    with pytest.raises(DataError, match="^data.label_names.*no name for label.s. 2"):
        kind.info(records(["0", "1", "2"]), data_cfg(tmp_path / "x.tsv", label_names={"0": "a", "1": "b"}))
    with pytest.raises(DataError, match="^data.label_names.*not distinct .same."):
        kind.info(records(["0", "1"]), data_cfg(tmp_path / "x.tsv", label_names={"0": "same", "1": "same"}))


def test_heldout_label_missing_from_training_is_a_data_error(kind, tmp_path):
    cfg = data_cfg(tmp_path / "x.tsv")
    message = r"^data.label_field = 'score': label\(s\) 3 appear in the held-out data but not in the training data"
    with pytest.raises(DataError, match=message):
        kind.info(records(["0", "1"]), cfg, heldout=records(["1", "3"]))
    info = kind.info(records(["0", "1"]), cfg)
    with pytest.raises(DataError, match=message):  # tokenize checks again: never a silent wrong id
        kind.encode(records(["1", "3"]), build_wordpiece_tokenizer(["text 1"]), cfg, info)


def test_encode_gives_int_class_ids_and_truncates(kind, bert_dir, tmp_path):
    from kubetune.tokenization import load_tokenizer

    tokenizer = load_tokenizer(bert_dir)
    rows = [{"text": "the film was great " * 20, "label": "2"}, {"text": "bad phone", "label": "0"}]
    columns = kind.encode(rows, tokenizer, DataConfig(path="x", label_field="score", max_length=12), THREE_CLASS_INFO)
    assert columns["labels"] == [2, 0] and all(type(label) is int for label in columns["labels"])
    assert len(columns["input_ids"][0]) == 12 and columns["input_ids"][0][0] == tokenizer.cls_token_id
    assert columns["attention_mask"][1] == [1] * len(columns["input_ids"][1])


# ---- metrics -----------------------------------------------------------------------------------
def test_metrics_match_hand_computed_values():
    truth = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    predicted = [0, 1, 0, 1, 2, 2, 2, 0, 2, 1]
    matrix = confusion_matrix(truth, predicted, 3)
    assert matrix.tolist() == [[2, 1, 0], [0, 1, 1], [1, 1, 3]]
    scores = scores_from(matrix)
    # class 0: P 2/3, R 2/3; class 1: P 1/3, R 1/2; class 2: P 3/4, R 3/5
    f1 = [2 / 3, 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2), 2 * 0.75 * 0.6 / 1.35]
    assert scores["accuracy"] == 0.6
    assert scores["precision"] == pytest.approx([2 / 3, 1 / 3, 3 / 4], abs=1e-5)
    assert scores["recall"] == pytest.approx([2 / 3, 1 / 2, 3 / 5], abs=1e-5)
    assert scores["f1"] == pytest.approx(f1, abs=1e-5)
    assert scores["macro_f1"] == pytest.approx(sum(f1) / 3, abs=1e-5)
    assert scores["support"] == [3, 2, 5]


def test_metrics_edge_cases():
    # never predicted -> precision 0; absent from truth and predictions -> left out of macro-F1
    scores = scores_from(confusion_matrix([0, 0, 1, 1], [0, 0, 0, 0], 3))
    assert scores["precision"] == [0.5, 0.0, 0.0] and scores["recall"] == [1.0, 0.0, 0.0]
    assert scores["macro_f1"] == pytest.approx((2 * 0.5 / 1.5 + 0) / 2, abs=1e-5)
    assert scores_from(confusion_matrix([1, 1], [1, 1], 2))["macro_f1"] == 1.0


def test_evaluate_reports_base_tuned_and_majority(kind):
    """evaluate() with stand-in models whose predictions are known: the tuned one is right on
    8 of 10, the base always says 'neutral'; majority (from training counts) is 'negative'."""
    from contextlib import nullcontext

    from datasets import Dataset

    from kubetune.config import RunConfig
    from kubetune.evaluation import evaluate
    from kubetune.modeling import Variants

    truth = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    tuned_pred = [0, 0, 0, 1, 2, 2, 2, 2, 2, 0]
    texts = [f"review {word}" for word in ("one two three four five six seven eight nine ten").split()]
    tokenizer = build_wordpiece_tokenizer(texts)
    encoded = tokenizer(texts)
    dataset = Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                                 "labels": truth})

    class Fixed(torch.nn.Module):
        """Answers the rows in the order they come (evaluate keeps the dataset's order)."""

        def __init__(self, answers):
            super().__init__()
            self.config = type("Config", (), {"pad_token_id": tokenizer.pad_token_id})()
            self.answers, self.seen = answers, 0
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask):
            answers = self.answers[self.seen:self.seen + len(input_ids)]
            self.seen += len(input_ids)
            return type("Out", (), {"logits": torch.nn.functional.one_hot(torch.tensor(answers), 3).float()})()

    cfg = RunConfig.from_dict({"task": "classification", "data": {"label_field": "score"},
                               "evaluate": {"max_samples": 10, "batch_size": 4, "num_generations": 2}})
    variants = Variants(base=lambda: nullcontext(Fixed([1] * 10)), tuned=lambda: nullcontext(Fixed(tuned_pred)))
    result = evaluate(kind, variants, tokenizer, dataset, THREE_CLASS_INFO, cfg)
    metrics = result.metrics
    assert metrics["eval/samples"] == 10
    assert metrics["eval/tuned_accuracy"] == 0.8 and metrics["eval/base_accuracy"] == 0.2
    assert metrics["eval/majority_accuracy"] == 0.3
    assert metrics["eval/majority_macro_f1"] == pytest.approx(2 * 0.3 / 1.3 / 3, abs=1e-5)
    assert metrics["eval/base_macro_f1"] == pytest.approx(2 * 0.2 / 1.2 / 3, abs=1e-5)
    assert metrics["eval/tuned_recall.positive"] == 0.8 and metrics["eval/tuned_precision.positive"] == 0.8
    assert metrics["eval/tuned_precision.negative"] == 0.75 and metrics["eval/support.positive"] == 5
    assert metrics["eval/tuned_f1.neutral"] == pytest.approx(2 / 3, abs=1e-5)
    assert result.tables["confusion_matrix"]["tuned"] == [[3, 0, 0], [0, 1, 1], [1, 0, 4]]
    assert result.generations == [{"text": "review one", "label": "negative", "base": "neutral", "tuned": "negative"},
                                     {"text": "review two", "label": "negative", "base": "neutral", "tuned": "negative"}]
    assert set(result.figures) == {"plots/confusion_matrix_base.png", "plots/confusion_matrix_tuned.png"}
    figure = result.figures["plots/confusion_matrix_tuned.png"]
    axis = figure.axes[0]
    assert [t.get_text() for t in axis.get_xticklabels()] == ["negative", "neutral", "positive"]
    assert sorted(t.get_text() for t in axis.texts) == sorted(str(v) for v in [3, 0, 0, 0, 1, 1, 1, 0, 4])
    import matplotlib.pyplot as plt

    for figure in result.figures.values():
        plt.close(figure)


# ---- the model: head, labels, pad token, LoRA, 8-bit ---------------------------------------------
def test_head_is_sized_from_the_label_set_and_names_are_saved(kind, bert_dir, tmp_path):
    model = load_base_model(bert_dir, "none", kind, THREE_CLASS_INFO)
    assert kind.trained_head(model) == ["classifier"]  # bert.pooler is in the checkpoint: not new
    assert model.classifier.out_features == 3
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["id2label"] == NAMES and saved["label2id"] == {"negative": 0, "neutral": 1, "positive": 2}
    assert saved["problem_type"] == "single_label_classification"
    assert meta_model(bert_dir, kind, THREE_CLASS_INFO).classifier.out_features == 3


def test_trained_head_is_found_from_the_model_not_a_table(kind):
    from transformers import AutoModelForSequenceClassification, GPT2Config, RobertaConfig

    with torch.device("meta"):
        gpt2 = AutoModelForSequenceClassification.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, num_labels=4))
        roberta = AutoModelForSequenceClassification.from_config(
            RobertaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64))
    assert kind.trained_head(gpt2) == ["score"]
    assert kind.trained_head(roberta) == ["classifier"]  # its dense + out_proj are both new


def test_decoder_without_pad_token_gets_the_tokenizers_pad_id(kind, llama_dir):
    """GPT-2/Llama ship no pad token; the classifier reads the last non-pad token, so the config
    must know the id the collator pads with (the tokenizer's, EOS when it has none)."""
    from kubetune.tokenization import load_tokenizer

    tokenizer = load_tokenizer(llama_dir)
    assert json.loads((llama_dir / "config.json").read_text()).get("pad_token_id") is None
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    batch = kind.collator(tokenizer)([tokenizer("the film was great"), tokenizer("bad")])

    unpadded = load_base_model(llama_dir, "none", kind, THREE_CLASS_INFO)
    with pytest.raises(ValueError, match="padding token"):
        unpadded(**batch)  # the guide's bug

    info = {**THREE_CLASS_INFO, "pad_token_id": tokenizer.pad_token_id}
    model = load_base_model(llama_dir, "none", kind, info)
    assert kind.trained_head(model) == ["score"] and model.score.out_features == 3
    assert model.config.pad_token_id == tokenizer.eos_token_id
    model.eval()
    with torch.no_grad():
        together = model(**batch).logits
        alone = model(**tokenizer("bad", return_tensors="pt")).logits
    assert torch.allclose(together[1], alone[0], atol=1e-5), "padding changed the short row's prediction"


def lora_config(**kwargs) -> ModelConfig:
    return ModelConfig(name_or_path="tiny", quantization=kwargs.pop("quantization", "none"),
                       gradient_checkpointing=False,
                       lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["query", "value"]), **kwargs)


def train_steps(model, tokenizer, kind, steps: int = 4) -> None:
    rows = sentiment_rows(16)
    info = {"labels": ["0", "1", "2"]}
    columns = kind.encode([{"text": r["review"], "label": r["score"]} for r in rows], tokenizer,
                          DataConfig(path="x", label_field="score"), info)
    batch = kind.collator(tokenizer)([{k: columns[k][i] for k in columns} for i in range(len(rows))])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_lora_trains_the_head_in_full_and_leaves_the_encoder(kind, bert_dir):
    from kubetune.tokenization import load_tokenizer

    torch.manual_seed(0)
    model = prepare_for_training(load_base_model(bert_dir, "none", kind, THREE_CLASS_INFO), lora_config(), "none",
                                 kind)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    head = {name for name in trainable if "lora_" not in name}
    assert head == {"base_model.model.classifier.modules_to_save.default.weight",
                    "base_model.model.classifier.modules_to_save.default.bias"}
    train_steps(model, load_tokenizer(bert_dir), kind)
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[name], after[name]) for name in trainable), "a trainable weight did not change"
    frozen = [name for name in before if name not in trainable]
    assert any(".bert.encoder." in name for name in frozen)
    assert all(torch.equal(before[name], after[name]) for name in frozen), "a frozen base weight changed"


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_8bit_lora_keeps_the_head_out_of_quantization(kind, which, bert_dir, llama_dir):
    from kubetune.tokenization import load_tokenizer

    model_dir = bert_dir if which == "bert" else llama_dir
    tokenizer = load_tokenizer(model_dir)
    info = {**THREE_CLASS_INFO, "pad_token_id": tokenizer.pad_token_id}
    model = load_base_model(model_dir, "8bit", kind, info)
    head_name = kind.trained_head(model)[0]
    head = model.get_submodule(head_name)
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
    assert "Linear8bitLt" in {type(m).__name__ for m in model.modules()}
    targets = ["query", "value"] if which == "bert" else ["q_proj", "v_proj"]
    cfg = lora_config(quantization="8bit")
    cfg.lora.target_modules = targets
    model = prepare_for_training(model, cfg, "8bit", kind)
    weight = f"base_model.model.{head_name}.modules_to_save.default.weight"
    start = model.get_parameter(weight).detach().clone()
    train_steps(model, tokenizer, kind, steps=2)
    assert not torch.equal(start, model.get_parameter(weight))


# ---- forgetting: masked-LM retention of the encoder ----------------------------------------------
def retention_cfg(path: Path, **train):
    from kubetune.config import RunConfig

    return RunConfig.from_dict({"task": "classification", "data": {"label_field": "score", "max_length": 32},
                                "train": {"seed": 3, **train},
                                "evaluate": {"retention_path": str(path), "retention_samples": 40, "batch_size": 8}})


def test_masked_lm_retention_needs_the_pretraining_head(bert_dir, bert_mlm_dir, llama_dir):
    from kubetune.modeling import masked_lm_model

    model, why_not = masked_lm_model(bert_dir)
    assert model is None and why_not.startswith("the checkpoint ships no masked-LM head (cls.predictions")
    model, why_not = masked_lm_model(llama_dir)
    assert model is None and why_not.startswith("llama has no masked-LM form")
    model, why_not = masked_lm_model(bert_mlm_dir)
    assert type(model).__name__ == "BertForMaskedLM" and why_not == ""


def test_masked_lm_retention_scores_the_encoder_through_the_checkpoints_head(kind, bert_mlm_dir, general_reviews):
    """Base and tuned read through the same head on the same masks: an unchanged encoder gives the
    checkpoint's own masked-LM loss and 0% forgetting; a changed one (embeddings too, as full
    fine-tuning changes them) gives the loss of a masked-LM built from its weights."""
    import contextlib
    import copy

    from transformers import BertForMaskedLM

    from kubetune.evaluation import masked_inputs, retention, retention_texts
    from kubetune.modeling import Variants, masked_lm_model
    from kubetune.scoring import encoder_of, masked_lm_losses
    from kubetune.tokenization import load_tokenizer

    def forgetting(base, tuned) -> dict:
        variants = Variants(base=lambda: contextlib.nullcontext(base), tuned=lambda: contextlib.nullcontext(tuned))
        return retention(kind, bert_mlm_dir, variants, tokenizer, cfg).metrics

    tokenizer = load_tokenizer(bert_mlm_dir)
    cfg = retention_cfg(general_reviews)
    classifier = load_base_model(bert_mlm_dir, "none", kind, THREE_CLASS_INFO)
    same = forgetting(classifier, classifier)
    assert same["eval/forgetting_pct"] == 0 and same["eval/retention.samples"] == 40

    rows = masked_inputs(tokenizer, retention_texts(cfg), 32, seed=3)
    assert all(sum(label != -100 for label in row["labels"]) >= 1 for row in rows)
    assert all(t == tokenizer.mask_token_id for row in rows for t, label in zip(row["input_ids"], row["labels"])
               if label != -100)

    def direct_perplexity(model):
        total, count = 0.0, 0
        with torch.no_grad():
            for row in rows:
                logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
                labels = torch.tensor(row["labels"])
                total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
                count += int((labels != -100).sum())
        return math.exp(total / count)

    reference = BertForMaskedLM.from_pretrained(bert_mlm_dir).eval()
    assert same["eval/retention.base_perplexity"] == pytest.approx(direct_perplexity(reference), rel=1e-4)

    changed = copy.deepcopy(classifier)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in changed.bert.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    drift = forgetting(classifier, changed)
    reference.bert.load_state_dict(changed.bert.state_dict(), strict=False)
    reference.tie_weights()
    assert reference.cls.predictions.decoder.weight is reference.bert.embeddings.word_embeddings.weight
    assert drift["eval/retention.base_perplexity"] == same["eval/retention.base_perplexity"]
    assert drift["eval/retention.tuned_perplexity"] == pytest.approx(direct_perplexity(reference), rel=1e-4)
    assert drift["eval/forgetting_pct"] != 0
    mlm, _ = masked_lm_model(bert_mlm_dir)
    masked_lm_losses(mlm, encoder_of(changed), rows, tokenizer.pad_token_id, batch_size=8)
    assert mlm.cls.predictions.decoder.weight is mlm.bert.embeddings.word_embeddings.weight, "head restored"
