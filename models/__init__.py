"""Pure computation: typed events, session logic, generators. Imports no other streamrec package."""
