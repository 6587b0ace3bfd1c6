"""Writes model.safetensors with random weights (transformers' initialisation, seed 0) for the
BERT config.json in the folder given: the stand-in for all-MiniLM-L6-v2's weights in the GPU
run's end-to-end stage (scripts/gpu/stage-e2e.sh explains why).

    python3 scripts/gpu/random_weights.py dist/e2e/home/models/random-all-MiniLM-L6-v2
"""

import sys

import torch
import transformers
from safetensors.torch import save_file


def main():
    folder = sys.argv[1]
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig.from_pretrained(folder))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              f"{folder}/model.safetensors", metadata={"format": "pt"})


if __name__ == "__main__":
    main()
