"""Column names shared by the sources, validation and splits (kept apart so none imports the others)."""

# Per-image facts some published lists carry (MORPH race/gender, aesthetics category, CLAP2015 stdv);
# validation and splitting pass them through so that later stages can report by them.
EXTRA_COLUMNS = ("race", "gender", "category", "stdv")
