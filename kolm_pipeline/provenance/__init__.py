"""The ground layer every stage builds on, importing nothing of the domain: content IDs (`cid`), canonical
encodings (`encoding`, `jsontext`), tenant keys (`keys`), DSSE receipts (`receipts`), atomic file writes
(`atomic`) and the `UserError` base of every "the input is wrong" error (`errors`)."""
