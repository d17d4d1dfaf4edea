"""kubetune_serving: the code a registered kubetune model runs when MLflow loads and serves it.

It is a package of its own because a registered version must load where kubetune is not installed
(kubetune is on no package index, and a pickled kubetune class would load nowhere else):
registration logs this package with the model (MLflow's `code_paths`), and MLflow executes
mlflow_model.py, which imports the package's logged copy. So the package imports the standard
library, numpy, pandas, torch, transformers and peft (bitsandbytes when installed) and never
kubetune; only mlflow_model.py imports mlflow. Its modules import each other relatively, so a
version runs the copy it was logged with even in a process that already imported another one.

kubetune imports it instead of keeping copies, so a served model batches, generates, renders chats
and builds prompts exactly as evaluation did: kubetune.scoring re-exports the loops,
kubetune.tasks.chat labels conversations with chat, kubetune.tasks.prompts builds prompts with
prompts (the Alpaca text lives there), kubetune.retrieval embeds with retrieval, and
kubetune.tokenization and kubetune.modeling take the tokenizer set-up and the quantization
settings from loading.

- cells: a DataFrame cell or column as the text training read
- loops: batches of similar length, class predictions, greedy generation
- chat: conversations, chat templates, the pieces a model learns and stops at
- prompts: instruction prompts (the Stanford Alpaca text)
- retrieval: the embedder and the passages nearest a prompt
- loading: tokenizer, where the base model is, base plus adapter
- model: ServedModel, what predict does for each task kind
- mlflow_model: the file MLflow executes (a model from code)
"""
