"""What a run produced, for people: status table, exported models, reports and plots (no Ray)."""
