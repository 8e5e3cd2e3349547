"""The commands, each a ``main(argv)`` that tests call in-process and a ``run()`` for its console
script. The top-level ``train.py``, ``eval.py``, ... only call these."""
