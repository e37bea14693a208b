"""Models: ``spec`` (ModelSpec), ``config`` (config.json -> spec: read, dispatch, check), one parser per family
(``llama``, ``decilm``), and ``rules``: the one mapping table (HF <-> mcore) every family's rows live in and both
directions read."""
