"""The partner's side: sign requests, produce them, await the correlated response."""
