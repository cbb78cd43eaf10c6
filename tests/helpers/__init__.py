"""Helpers that test modules share. Test modules import them from here (`tests.helpers.*`),
never from another test module or from a conftest; fixtures stay in the conftests."""
