"""The formats of a user's own data, in words: the help of `l2rclip prepare` and its DVC stage.

Kept apart from the sources (`l2rclip/data/sources/generic.py` reads them) so that building the
`l2rclip` command line imports nothing heavy. docs/data.md ("Your own data") has the worked example.
"""

PREPARE_DESCRIPTION = """\
Read the data source named in the params file, decode and check every image and label once, split
the good rows into folds, and write images.csv, bad_rows.csv, splits.csv, holdout.csv and
summary.json. The source data is only read."""

DATA_FORMATS = """\
your own data (params.yaml data.source):
  csv     a list file: <data.root>/labels.csv (or data.list_file; .tsv and .txt are tab-separated)
          with a header row naming the columns, in any order (other columns are ignored):
            path   image path relative to data.root (or absolute)              required
            label  the image's rank label, e.g. an age                         required
            group  person/subject id: kfold keeps each group on one side       optional
            fold   integer fold id, on every row (split.protocol: given)       optional
            split  train | val | test, on every row (split.protocol: given)    optional
  folder  one folder per label: <data.root>/<label>/<image> (subfolders are read too;
          images directly in data.root have no label and are skipped)
labels must be ranks: the integers ranks.start..ranks.stop, or the list ranks.labels (with
ranks.values, a number per label). A row with a missing or unreadable image or a label that is not
a rank is left out and listed in bad_rows.csv with its reason (data.on_bad: fail stops instead)."""
