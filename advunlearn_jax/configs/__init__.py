"""The shipped configs: the reference's runs (nudity, style, object), their shared base, and the tiny world's.

In a checkout they are also `configs/` (a link to this folder), as the README's commands name them. An installed
package has no such folder: `--config=configs/NAME.py` names this folder's file whenever the working folder has no
`configs/NAME.py` of its own (cli.py), so the same commands run from anywhere; a config file of your own is
given by its path as usual.
"""
