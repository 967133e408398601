"""What a run leaves on disk: files written atomically, so a crash never tears one."""
