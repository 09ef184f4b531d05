"""Training for aMUSEd: data, the masked-token objective, the accelerate training loop, VQGAN training.

    data.py          image-caption sources (image folder, `datasets` dataset, tar shards), preprocessing
    preencode.py     `amused preencode`: VQ tokens + text embeddings stored once in safetensors shards
    masking.py       the MaskGIT/MUSE objective: cosine mask rate, masked cross-entropy, text dropout
    optim.py         AdamW / 8-bit AdamW, LR schedules, optimizer step fused into backward, EMA
    checkpoint.py    atomic, resumable checkpoint directories, keep-last-N
    train.py         `amused train` / `amused finetune` (full or LoRA)
    prior.py         prior preservation (DreamBooth) for `amused finetune`: class images, paired batches
    vqgan_train.py   `amused train-vqgan`
    cli.py           argparse subcommands
"""
