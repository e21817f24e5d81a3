"""The event stream: what happened, recorded in the transaction that made it so."""
