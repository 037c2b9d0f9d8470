"""qmoi-sync device agent."""
