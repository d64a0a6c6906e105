"""The replies service: reads each account's mailbox and classifies what comes back."""
