"""Question templates, in English and Chinese, for every kind of fact the generator can ask about.

`ask(rng, key, answer, lang)` phrases a question about `key` (e.g. "total", "date") and pairs it
with its exact answer. Three times in five the question is in the document's language, otherwise
in the other one, so "总金额是多少？" works on an English receipt and "What is the date?" on a
Chinese invoice.
"""

from __future__ import annotations

import random

from glmv.synth.document import QA

__all__ = ["QUESTIONS", "READ_PROMPTS", "ask"]

QUESTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # key: (English phrasings, Chinese phrasings)
    "total": (
        (
            "What is the total?",
            "What is the total amount?",
            "How much is the total?",
            "How much was paid in total?",
            "What is the grand total?",
        ),
        ("总金额是多少？", "合计多少钱？", "一共多少钱？", "总计是多少？", "总金额是多少"),
    ),
    "date": (
        (
            "What is the date?",
            "What date is shown?",
            "What is the date on this document?",
            "When was this issued?",
        ),
        ("日期是哪天？", "日期是什么？", "这是哪天的？", "上面的日期是多少？"),
    ),
    "time": (
        ("What time is shown?", "What is the time on the receipt?"),
        ("时间是几点？", "上面的时间是多少？"),
    ),
    "merchant": (
        ("What is the name of the store?", "Which shop is this receipt from?", "What is the merchant name?"),
        ("商家名称是什么？", "这是哪家店的小票？", "店名是什么？"),
    ),
    "item_count": (
        ("How many different items are listed?", "How many items are on the receipt?"),
        ("小票上有几种商品？", "一共买了几种商品？"),
    ),
    "subtotal": (("What is the subtotal?",), ("小计是多少？",)),
    "tax": (
        ("What is the tax?", "How much tax was charged?", "What is the tax amount?"),
        ("税额是多少？", "税是多少？"),
    ),
    "payment": (
        ("How was it paid?", "What payment method was used?"),
        ("支付方式是什么？", "用什么方式付的款？"),
    ),
    "receipt_number": (("What is the receipt number?",), ("单号是多少？",)),
    "item_amount": (
        ("How much is the {item}?", "What does the {item} cost?"),
        ("{item}多少钱？", "{item}的金额是多少？"),
    ),
    "invoice_number": (("What is the invoice number?",), ("发票号码是多少？", "发票号是多少？")),
    "invoice_code": (("What is the invoice code?",), ("发票代码是多少？",)),
    "seller": (
        ("Who is the seller?", "What is the seller's name?"),
        ("销售方名称是什么？", "销售方是谁？", "开票单位是哪家？"),
    ),
    "buyer": (("Who is the buyer?", "What is the buyer's name?"), ("购买方名称是什么？", "购买方是谁？")),
    "net_amount": (("What is the amount before tax?",), ("不含税金额是多少？", "金额合计是多少？")),
    "invoice_type": (("What type of invoice is this?",), ("这是什么类型的发票？", "发票类型是什么？")),
    "name": (
        ("What is the name?", "What is the name on the card?", "Whose card is this?"),
        ("姓名是什么？", "名字是什么？", "这是谁的证件？"),
    ),
    "id_number": (("What is the ID number?",), ("身份证号码是多少？", "公民身份号码是多少？")),
    "birth_date": (
        ("What is the date of birth?", "When was this person born?"),
        ("出生日期是哪天？", "出生日期是什么？"),
    ),
    "sex": (("What is the sex on the card?",), ("性别是什么？",)),
    "ethnicity": (("What ethnic group is shown?",), ("民族是什么？",)),
    "address": (("What is the address?",), ("住址是哪里？", "地址是什么？")),
    "authority": (("Which authority issued the card?",), ("签发机关是哪里？",)),
    "valid_period": (("What is the validity period?",), ("有效期限是多少？",)),
    "credit_code": (
        ("What is the unified social credit code?",),
        ("统一社会信用代码是什么？", "信用代码是多少？"),
    ),
    "company": (
        ("What is the company name?", "Which company is this?"),
        ("公司名称是什么？", "企业名称是什么？", "这是哪家公司？"),
    ),
    "legal_rep": (("Who is the legal representative?",), ("法定代表人是谁？",)),
    "capital": (("What is the registered capital?",), ("注册资本是多少？",)),
    "founded": (
        ("When was the company founded?", "What is the date of establishment?"),
        ("成立日期是哪天？", "成立日期是什么？"),
    ),
    "phone": (
        ("What is the phone number?", "What number can I call?"),
        ("电话是多少？", "电话号码是多少？", "手机号是多少？"),
    ),
    "email": (("What is the email address?",), ("邮箱是什么？", "电子邮箱是多少？")),
    "title": (
        ("What is the job title?", "What is this person's position?"),
        ("职位是什么？", "职务是什么？"),
    ),
    "row_count": (("How many rows does the table have?",), ("表格有几行数据？",)),
    "cell": (("What is the {column} of {row}?",), ("{row}的{column}是多少？",)),
    "table_title": (("What is the title of the table?",), ("表格的标题是什么？",)),
    "chat_title": (
        ("What is the name of this chat?", "Who is this conversation with?"),
        ("这个聊天的名称是什么？", "这是和谁的聊天？"),
    ),
    "last_message": (("What does the last message say?",), ("最后一条消息说了什么？",)),
    "message_count": (("How many messages are there?",), ("一共有几条消息？",)),
}

READ_PROMPTS: tuple[tuple[str, ...], tuple[str, ...]] = (
    (
        "Read all the text in the image.",
        "Transcribe the text in this image.",
        "What does the document say? Copy the text.",
    ),
    ("识别图中的所有文字。", "请把图片中的文字抄写出来。", "图片上写了什么？"),
)


def ask(rng: random.Random, key: str, answer: str, lang: str, **fmt: str) -> QA:
    en, zh = QUESTIONS[key]
    own = rng.random() < 0.6
    use_en = (lang == "en") == own
    question = rng.choice(en if use_en else zh).format(**fmt)
    return QA(question, answer, key)
