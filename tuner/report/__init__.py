"""Reading a study back, from storage alone: `kttune best` tables, `kttune export` profiles,
`kttune report` data and its HTML/PNG rendering, trial files as Optuna artifacts and the
dashboard note."""
