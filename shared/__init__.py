"""Types, protocol and planning shared by the desktop and the device agent.

Imports only the standard library and numpy: an agent on a board imports this
package without torch, Qt or transformers.
"""
