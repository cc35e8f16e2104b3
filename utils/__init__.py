"""Code the scripts share, one module per concern (no script imports another script):

    utils.cli        errors and the command line: UserError, `error:` lines and exit status, --help, quiet start-up
    utils.files      atomic writers with normal permissions, checked JSON and jsonl readers
    utils.prompts    the prompt contract: system template, roles (from files and cards), the record a model carries
    utils.cards      character cards (SillyTavern / TavernAI, JSON or PNG): reading, names, example dialogues
    utils.lorebook   lorebooks and notes (SillyTavern World Info): which entries a conversation fires, and where
    utils.st_chats   SillyTavern chat logs (one-on-one and group) as training rows
    utils.scenes     group scenes: a character's seat, the group note, speaker bleed
    utils.rolebench  reading RoleBench-format files (data_helper.py and evaluate.py)
    utils.data       training samples and conversations: reading, encoding, packing, batching
    utils.models     loading base models, adapters and tokenizers, and their one-line load errors
    utils.pairs      preference pairs: reading and checking, encoding, packing, batching
    utils.pair_sources  pairs that data_helper.py makes: SillyTavern swipes, a model's replies out of character
    utils.preference preference losses (DPO, IPO, ORPO, SimPO), their metrics, the reference log-probabilities
    utils.training   the training package: config (TrainConfig), distributed, deepspeed_config, sizes,
                     schedule, steps (a step, throughput, evaluation) and checkpoints
    utils.signals    clean stops of a training run on SIGINT/SIGTERM, and the stall points of its tests
    utils.lock       a run's exclusive lock on its output (train.py, merge_params.py)
    utils.chat       the chat building blocks: model and sampling flags, checks, Sampling, the generation bound
    utils.assembly   any OpenAI message list (SillyTavern's included) as the model's prompt messages
    utils.engine     ChatEngine, beneath the page, the API and predict.py: model, roles, limits, checks, prompt
    utils.api        the OpenAI-compatible API beside the page, on a ChatEngine
    utils.guard      the serving boundary: Host check, CORS, the key on the headers, body and time limits
    utils.report     evaluate.py's report: tables, JSON and the written files
    utils.consistency  evaluate.py's character-consistency metrics: self-disclosure, speaker bleed, repetition
    utils.judge      evaluate.py's optional LLM judge through an OpenAI-compatible endpoint: rubric, strict parse

Nothing here is imported by `import utils`: each module is imported by name, and none of them
imports anything heavy at the top, so that `--help` stays instant.
"""
