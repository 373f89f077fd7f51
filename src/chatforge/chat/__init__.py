"""Conversations and chat sessions: messages (validated), chat templates rendered into prompt ids,
and ChatModel, which fits a conversation into the context and asks the engine for the reply.

    conversation.py  Conversation: the messages, HF-style
    template.py      ChatFormat: Jinja chat templates, generation prompts, stop tokens
    session.py       ChatModel.reply() and CHAT_DEFAULTS, the one set of chat generation defaults
"""
