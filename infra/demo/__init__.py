"""The demo: ``varsr demo`` (``demo.py``: corpus -> shards -> finetune the shipped base -> register -> serve ->
upscale a held-out photo beside bicubic) and ``varsr demo pretrain`` (``pretrain.py``: the recipe that made the
shipped base model), with the held-out quality measurements they share (``quality.py``). With ``infra/cli.py`` these
are the only modules that compose components; nothing else imports them."""
