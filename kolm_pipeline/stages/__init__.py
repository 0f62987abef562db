"""Stage orchestration: runs one stage for one namespace (reads its inputs, writes its outputs and signed
receipt under the namespace's work directory), called alike by the Dagster assets (`defs/`) and the CLI.

One module per asset of the loop (`corpus`, `adapter`, `evaluation`, `deployment`) plus what glues them:
`workdir` (where a namespace's outputs and receipts live), `compile` (`kolm compile`: a recipe directory to a
signed `.kolm`), `suite` (`kolm eval`), `drift` (the drift sensor's check), `backlog` (pairs since the last
distill) and `diff` (`kolm registry diff`). Domain packages below never import this layer.
"""
