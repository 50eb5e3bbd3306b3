"""What every app shares: the settings table and serving a web app until a signal."""
