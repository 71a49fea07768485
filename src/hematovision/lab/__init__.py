"""The laboratory's people and their work: accounts, corrections, the reviewed-results report and
the corrections' export as a DVC dataset version."""
