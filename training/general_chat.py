# Synthetic general chat set (zh + en) that the tiny base model is trained on; for real bases its prompts are
# replay prompts, and where a pair has a `check` a base's wrong answer is replaced by the written one.
# Library module, no CLI; inspect it with:
#   python -c "from training.general_chat import general_pairs; print(len(general_pairs()))"
# Everything is generated deterministically from the tables below (no randomness, no files), so the base
# model, the replay data and the evaluation all agree on the same prompts.
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Literal

Lang = Literal["zh", "en"]

# The base model's own identity, modelled on the real InternLM2.5 chat model: the fine-tune must replace it.
BASE_IDENTITY_ZH = "我是书生·浦语，由上海人工智能实验室开发的AI助手。"
BASE_IDENTITY_EN = "I am InternLM (书生·浦语), an AI assistant developed by Shanghai AI Laboratory."

# Words that mark a prompt as being about the assistant itself; general prompts never contain them.
IDENTITY_MARKERS: tuple[str, ...] = (
    "你是谁", "你叫", "名字", "你自己", "谁开发", "谁创造", "你是什么",
    "who are you", "your name", "yourself", "who made you", "who created you", "who developed you",
    "what are you",
)

# One of every EVAL_EVERY prompts of each (topic, language) group is held out for evaluation.
EVAL_EVERY = 4


@dataclass(frozen=True)
class ChatPair:
    """One single-turn exchange.

    Args:
        prompt: the user's message.
        answer: the assistant's reply.
        lang: language of the exchange, "zh" or "en".
        topic: what the exchange is about (e.g. "capital", "arithmetic", "identity").
        check: what a right reply says (see `is_right`); empty when a reply cannot be checked.
    """

    prompt: str
    answer: str
    lang: Lang
    topic: str
    check: tuple[str, ...] = ()

    def messages(self) -> list[dict[str, str]]:
        """The exchange as chat messages (user then assistant)."""
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.answer}]


# (zh country, zh capital, en country, en capital)
_CAPITALS = [
    ("中国", "北京", "China", "Beijing"), ("日本", "东京", "Japan", "Tokyo"),
    ("法国", "巴黎", "France", "Paris"), ("英国", "伦敦", "the United Kingdom", "London"),
    ("德国", "柏林", "Germany", "Berlin"), ("意大利", "罗马", "Italy", "Rome"),
    ("俄罗斯", "莫斯科", "Russia", "Moscow"), ("美国", "华盛顿", "the United States", "Washington"),
    ("加拿大", "渥太华", "Canada", "Ottawa"), ("澳大利亚", "堪培拉", "Australia", "Canberra"),
    ("韩国", "首尔", "South Korea", "Seoul"), ("埃及", "开罗", "Egypt", "Cairo"),
    ("西班牙", "马德里", "Spain", "Madrid"), ("印度", "新德里", "India", "New Delhi"),
]

# (zh thing, zh colour, en thing, en colour)
_COLOURS = [
    ("天空", "蓝色", "the sky", "blue"), ("草", "绿色", "grass", "green"),
    ("雪", "白色", "snow", "white"), ("香蕉", "黄色", "a banana", "yellow"),
    ("煤炭", "黑色", "coal", "black"), ("草莓", "红色", "a strawberry", "red"),
    ("胡萝卜", "橙色", "a carrot", "orange"), ("葡萄", "紫色", "a grape", "purple"),
]

# (zh question, zh answer, en question, en answer, zh check, en check)
_ANIMALS = [
    ("猫会怎么叫？", "猫会喵喵叫。", "What sound does a cat make?", "A cat says meow.", ("喵",), ("meow",)),
    ("狗会怎么叫？", "狗会汪汪叫。", "What sound does a dog make?", "A dog says woof.", ("汪",), ("woof",)),
    ("牛会怎么叫？", "牛会哞哞叫。", "What sound does a cow make?", "A cow says moo.", ("哞",), ("moo",)),
    ("狗有几条腿？", "狗有四条腿。", "How many legs does a dog have?", "A dog has four legs.",
     ("四", "4"), ("four", "4")),
    ("鸡有几条腿？", "鸡有两条腿。", "How many legs does a chicken have?", "A chicken has two legs.",
     ("两", "2"), ("two", "2")),
    ("蜘蛛有几条腿？", "蜘蛛有八条腿。", "How many legs does a spider have?", "A spider has eight legs.",
     ("八", "8"), ("eight", "8")),
    ("鱼生活在哪里？", "鱼生活在水里。", "Where do fish live?", "Fish live in water.", ("水",), ("water",)),
    ("熊猫喜欢吃什么？", "熊猫喜欢吃竹子。", "What do pandas like to eat?", "Pandas like to eat bamboo.",
     ("竹",), ("bamboo",)),
    ("什么动物会飞？", "鸟会飞。", "Which animal can fly?", "A bird can fly.", ("鸟",), ("bird",)),
    ("世界上最大的动物是什么？", "世界上最大的动物是蓝鲸。", "What is the largest animal in the world?",
     "The largest animal in the world is the blue whale.", ("蓝鲸",), ("blue whale",)),
]

_DAYS_ZH = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
_DAYS_EN = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS_ZH = [f"{m}月" for m in ("一", "二", "三", "四", "五", "六", "七", "八", "九", "十", "十一", "十二")]
_MONTHS_EN = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
              "October", "November", "December"]

# (zh word, zh opposite, en word, en opposite)
_OPPOSITES = [
    ("大", "小", "big", "small"), ("高", "矮", "tall", "short"), ("快", "慢", "fast", "slow"),
    ("热", "冷", "hot", "cold"), ("长", "短", "long", "short"), ("多", "少", "many", "few"),
    ("黑", "白", "black", "white"), ("上", "下", "up", "down"), ("开", "关", "open", "closed"),
    ("新", "旧", "new", "old"), ("早", "晚", "early", "late"), ("胖", "瘦", "fat", "thin"),
]

# (prompt, answer, lang)
_SMALL_TALK: list[tuple[str, str, Lang]] = [
    ("你好", "你好！有什么可以帮你的吗？", "zh"),
    ("你好！", "你好！很高兴见到你。", "zh"),
    ("早上好", "早上好！祝你今天过得愉快。", "zh"),
    ("晚上好", "晚上好！今天过得怎么样？", "zh"),
    ("谢谢你", "不客气！", "zh"),
    ("非常感谢！", "不用谢，很高兴能帮到你。", "zh"),
    ("再见", "再见，祝你一切顺利！", "zh"),
    ("晚安", "晚安，做个好梦！", "zh"),
    ("你今天好吗？", "我很好，谢谢！你呢？", "zh"),
    ("我有点累", "那就好好休息一下吧。", "zh"),
    ("生日快乐！", "谢谢你的祝福！", "zh"),
    ("新年快乐！", "新年快乐！祝你万事如意。", "zh"),
    ("Hello", "Hello! How can I help you today?", "en"),
    ("Hi!", "Hi! Nice to meet you.", "en"),
    ("Good morning", "Good morning! Have a nice day.", "en"),
    ("Good evening", "Good evening! How was your day?", "en"),
    ("Thank you", "You're welcome!", "en"),
    ("Thanks a lot!", "No problem, glad I could help.", "en"),
    ("Goodbye", "Goodbye, take care!", "en"),
    ("Good night", "Good night, sleep well!", "en"),
    ("How are you?", "I'm fine, thank you! And you?", "en"),
    ("I am a bit tired", "Then take a good rest.", "en"),
    ("Happy birthday!", "Thank you for the kind wishes!", "en"),
    ("Happy new year!", "Happy new year! All the best to you.", "en"),
]

_HOW_TO: list[tuple[str, str, Lang]] = [
    ("怎么煮米饭？", "把米洗净，加适量的水，放进电饭锅煮熟就可以了。", "zh"),
    ("怎么泡茶？", "把茶叶放进杯子，倒入热水，等两三分钟就可以喝了。", "zh"),
    ("怎样才能睡个好觉？", "按时睡觉，睡前少看手机，保持房间安静。", "zh"),
    ("怎么保持健康？", "多运动，吃得均衡，睡眠充足。", "zh"),
    ("怎么学好英语？", "每天多听多说，坚持读写练习。", "zh"),
    ("下雨天出门要带什么？", "下雨天出门要带雨伞。", "zh"),
    ("How do I boil an egg?", "Put the egg in boiling water for about ten minutes.", "en"),
    ("How do I make tea?", "Put tea leaves in a cup, add hot water and wait two or three minutes.", "en"),
    ("How can I sleep better?", "Go to bed on time and keep the room quiet.", "en"),
    ("How do I stay healthy?", "Exercise often, eat a balanced diet and get enough sleep.", "en"),
    ("How can I learn a new language?", "Practise a little every day: listen, speak, read and write.", "en"),
    ("What should I take when it rains?", "Take an umbrella when it rains.", "en"),
]

_BASE_IDENTITY_PROMPTS: list[tuple[str, Lang]] = [
    ("你是谁？", "zh"), ("请介绍一下你自己", "zh"), ("你叫什么名字？", "zh"), ("你是由谁开发的？", "zh"),
    ("Who are you?", "en"), ("Please introduce yourself.", "en"), ("What is your name?", "en"),
    ("Who developed you?", "en"),
]

_ZH_DIGITS = "零一二三四五六七八九"
Row = tuple[str, str, str, tuple[str, ...]]  # (prompt, answer, topic, check)
NUMBER = re.compile(r"\d+")


def _zh_number(n: int) -> str:
    """Chinese numeral for 0..99 (e.g. 12 -> 十二, 40 -> 四十)."""
    if not 0 <= n < 100:
        raise ValueError(f"only 0..99 are supported, got {n}")
    if n < 10:
        return _ZH_DIGITS[n]
    tens, ones = divmod(n, 10)
    return ("" if tens == 1 else _ZH_DIGITS[tens]) + "十" + ("" if ones == 0 else _ZH_DIGITS[ones])


def _facts() -> list[ChatPair]:
    zh: list[Row] = []
    en: list[Row] = []
    for zc, zcap, ec, ecap in _CAPITALS:
        zh.append((f"{zc}的首都是哪里？", f"{zc}的首都是{zcap}。", "capital", (zcap,)))
        en.append((f"What is the capital of {ec}?", f"The capital of {ec} is {ecap}.", "capital", (ecap,)))
    for zt, zcol, et, ecol in _COLOURS:
        zh.append((f"{zt}是什么颜色的？", f"{zt}是{zcol}的。", "colour", (zcol.removesuffix("色"),)))
        en.append((f"What colour is {et}?", f"{et[0].upper()}{et[1:]} is {ecol}.", "colour", (ecol,)))
    for zq, za, eq, ea, zcheck, echeck in _ANIMALS:
        zh.append((zq, za, "animal", zcheck))
        en.append((eq, ea, "animal", echeck))
    for i, (day_zh, day_en) in enumerate(zip(_DAYS_ZH, _DAYS_EN, strict=True)):
        next_zh, next_en = _DAYS_ZH[(i + 1) % 7], _DAYS_EN[(i + 1) % 7]
        zh.append((f"{day_zh}的后一天是星期几？", f"{day_zh}的后一天是{next_zh}。", "calendar", (next_zh,)))
        en.append((f"What day comes after {day_en}?", f"{next_en} comes after {day_en}.", "calendar",
                   (next_en,)))
    for i, (month_zh, month_en) in enumerate(zip(_MONTHS_ZH, _MONTHS_EN, strict=True)):
        next_zh, next_en = _MONTHS_ZH[(i + 1) % 12], _MONTHS_EN[(i + 1) % 12]
        zh.append((f"{month_zh}的下一个月是几月？", f"{month_zh}的下一个月是{next_zh}。", "calendar",
                   (next_zh,)))
        en.append((f"What month comes after {month_en}?", f"{next_en} comes after {month_en}.", "calendar",
                   (next_en,)))
    zh += [("一年有几个月？", "一年有十二个月。", "calendar", ("十二", "12")),
           ("一个星期有几天？", "一个星期有七天。", "calendar", ("七", "7"))]
    en += [("How many months are in a year?", "There are twelve months in a year.", "calendar",
            ("twelve", "12")),
           ("How many days are in a week?", "There are seven days in a week.", "calendar", ("seven", "7"))]
    for zw, zo, ew, eo in _OPPOSITES:
        zh.append((f"“{zw}”的反义词是什么？", f"“{zw}”的反义词是“{zo}”。", "opposite", (zo,)))
        en.append((f"What is the opposite of {ew}?", f"The opposite of {ew} is {eo}.", "opposite", (eo,)))
    return _pairs(zh, "zh") + _pairs(en, "en")


def _arithmetic() -> list[ChatPair]:
    """Single-digit sums, differences and products: a fixed, spread-out subset so the set stays small."""
    zh: list[Row] = []
    en: list[Row] = []
    for a in range(1, 10):
        for b in range(1, 10):
            for op_zh, op_en, result, taken in (
                ("加", "plus", a + b, (a + b) % 3 == 2),  # 27 of the 81 pairs, every a and b (3 + 5 too)
                ("减", "minus", a - b, a > b and (a + b) % 3 == 1),
                ("乘以", "times", a * b, a <= b and (a * b) % 4 in (0, 3)),
            ):
                if taken:
                    check = (str(result),)
                    zh.append((f"{a}{op_zh}{b}等于几？", f"{a}{op_zh}{b}等于{result}。", "arithmetic", check))
                    en.append((f"What is {a} {op_en} {b}?", f"{a} {op_en} {b} is {result}.", "arithmetic",
                               check))
    for n in (3, 7, 12, 15, 20, 26, 38, 44, 59, 61):
        zh.append((f"用汉字怎么写{n}？", f"{n}用汉字写作{_zh_number(n)}。", "arithmetic", (_zh_number(n),)))
    return _pairs(zh, "zh") + _pairs(en, "en")


def _pairs(rows: list[Row], lang: Lang) -> list[ChatPair]:
    return [ChatPair(prompt, answer, lang, topic, check) for prompt, answer, topic, check in rows]


def _conversation() -> list[ChatPair]:
    return [ChatPair(p, a, lang, "small_talk") for p, a, lang in _SMALL_TALK] + [
        ChatPair(p, a, lang, "how_to") for p, a, lang in _HOW_TO
    ]


@cache
def _general() -> tuple[ChatPair, ...]:
    pairs = tuple(_facts() + _arithmetic() + _conversation())
    prompts = [p.prompt for p in pairs]
    duplicates = sorted({p for p in prompts if prompts.count(p) > 1})
    if duplicates:  # guards the tables above: one prompt must have exactly one answer
        raise ValueError(f"duplicate general prompts: {duplicates}")
    leaked = [p.prompt for p in pairs if is_identity_prompt(p.prompt)]
    if leaked:
        raise ValueError(f"general prompts that ask about the assistant itself: {leaked}")
    return pairs


def is_identity_prompt(prompt: str) -> bool:
    """Whether a prompt asks about the assistant itself (by IDENTITY_MARKERS).

    Args:
        prompt: the user's message.
    """
    low = prompt.lower()
    return any(marker in low for marker in IDENTITY_MARKERS)


def is_right(reply: str, check: tuple[str, ...]) -> bool:
    """Whether a reply says what `check` asks: a number in it must be the reply's last number (a wrong sum
    names its operands too), a word must appear (case-insensitive). One of them is enough.

    Args:
        reply: the model's reply.
        check: a ChatPair's check (non-empty).
    """
    numbers = NUMBER.findall(reply)
    return any(numbers[-1:] == [c] if c.isdigit() else c.lower() in reply.lower() for c in check)


def general_pairs() -> list[ChatPair]:
    """All general (non-identity) exchanges, zh + en, in a fixed order."""
    return list(_general())


def checkable_pairs() -> dict[str, ChatPair]:
    """The general exchanges whose replies can be checked (a non-empty `check`), by prompt."""
    return {pair.prompt: pair for pair in _general() if pair.check}


def base_identity_pairs() -> list[ChatPair]:
    """The base model's own identity exchanges (书生·浦语 / InternLM), which a fine-tune must replace."""
    return [
        ChatPair(p, BASE_IDENTITY_ZH if lang == "zh" else BASE_IDENTITY_EN, lang, "identity")
        for p, lang in _BASE_IDENTITY_PROMPTS
    ]


def _is_eval(index_in_group: int) -> bool:
    return index_in_group % EVAL_EVERY == EVAL_EVERY - 1


def _split() -> tuple[list[str], list[str]]:
    seen: dict[tuple[str, str], int] = {}
    replay: list[str] = []
    held_out: list[str] = []
    for pair in _general():
        key = (pair.topic, pair.lang)
        index = seen.get(key, 0)
        seen[key] = index + 1
        (held_out if _is_eval(index) else replay).append(pair.prompt)
    return replay, held_out


def replay_prompts() -> list[str]:
    """General prompts whose base-model answers a fine-tune may replay (disjoint from eval_prompts)."""
    return _split()[0]


def eval_prompts() -> list[str]:
    """General prompts held out from replay, used to measure how much general behaviour a fine-tune keeps."""
    return _split()[1]


def tokenizer_corpus() -> list[str]:
    """Text the tokenizer is trained on: every exchange plus a little extra zh/en text, so that words a
    fine-tune is likely to use (names, assistant, model, laboratory...) still get compact tokens."""
    extra = [
        "我是你的小助手，可以回答问题、陪你聊天、帮你做简单的计算。",
        "这个模型是在上海AI实验室书生·浦语大模型的基础上微调得到的。",
        "人工智能助手可以用中文和英文回答问题，也可以写作、翻译和总结。",
        "今天天气很好，我们一起去公园散步吧。学习新知识让人快乐。",
        "I am your little assistant. I can answer questions, chat with you and help with simple maths.",
        "This model was fine-tuned from a large language model built by a laboratory.",
        "An AI assistant can answer questions in Chinese and English, write, translate and summarise.",
        "The weather is nice today. Let us take a walk in the park and learn something new.",
    ]
    text = [f"{p.prompt}\n{p.answer}" for p in general_pairs() + base_identity_pairs()]
    return text + extra


# Everyday prompts for the leakage and agreement checks, in families that no training data comes from (the
# replay families above are facts, arithmetic, small talk and how-to): the identity must not leak into them.
EVERYDAY_PROMPTS: dict[str, dict[Lang, tuple[str, ...]]] = {
    "weather": {
        "zh": ("今天降温了，出门穿什么合适？", "下雪天开车要注意什么？", "夏天太热睡不着怎么办？",
               "为什么雷声总在闪电之后？", "春天容易过敏，有什么建议？", "台风天应该做哪些准备？"),
        "en": ("It is getting cold today. What should I wear outside?", "Any advice for driving in snow?",
               "It is too hot to sleep in summer. Any tips?", "Why do we hear thunder after lightning?",
               "What can I do about spring allergies?", "How should I prepare for a big storm?"),
    },
    "cooking": {
        "zh": ("晚饭想吃点清淡的，推荐几个菜", "番茄炒蛋先放番茄还是先放蛋？", "剩米饭可以做什么？",
               "周末想烤蛋糕，需要准备哪些材料？", "早餐吃什么比较健康？", "煮面条时水里要加盐吗？"),
        "en": ("I want something light for dinner. Any ideas?", "What can I make with leftover rice?",
               "What do I need to bake a simple cake?", "What is a healthy breakfast?",
               "Should I salt the water when cooking pasta?", "Suggest a quick vegetarian lunch."),
    },
    "travel": {
        "zh": ("第一次坐飞机要注意什么？", "去海边旅行要带哪些东西？", "长途火车上怎么打发时间？",
               "出国旅行前要准备什么？", "怎样避免旅行时迷路？", "爬山前需要做哪些准备？"),
        "en": ("What should I know before my first flight?", "What should I pack for a beach trip?",
               "How can I pass the time on a long train ride?", "What should I prepare before travelling "
               "abroad?", "How can I avoid getting lost in a new city?", "How should I prepare for a hike?"),
    },
    "feelings": {
        "zh": ("考试没考好，心情很差", "明天要演讲，我很紧张", "最近总是失眠，怎么办？",
               "和朋友吵架了，该怎么和好？", "工作压力好大", "一个人在外地有点孤单"),
        "en": ("I failed my exam and I feel terrible.", "I have to give a speech tomorrow and I'm nervous.",
               "I keep waking up at night. What can I do?", "I had a fight with a friend. How do we make up?",
               "Work has been really stressful lately.", "I just moved to a new city and feel lonely."),
    },
    "science": {
        "zh": ("为什么天空是蓝色的？", "月亮为什么会有圆缺变化？", "植物为什么需要阳光？",
               "为什么冬天会下雪？", "彩虹是怎么形成的？", "为什么海水是咸的？"),
        "en": ("Why is the sky blue?", "Why does the moon change shape?", "Why do plants need sunlight?",
               "How does a rainbow form?", "Why is sea water salty?",
               "Why do leaves change colour in autumn?"),
    },
    "writing": {
        "zh": ("帮我写一句生日祝福", "写一句关于春天的诗", "帮我给老师写一句感谢的话",
               "用一句话描述大海", "给我的小猫想个可爱的称呼", "写一句鼓励朋友的话"),
        "en": ("Write a short birthday message for my sister.", "Write a line of poetry about spring.",
               "Help me write a thank-you note to my teacher.", "Describe the ocean in one sentence.",
               "Suggest a cute name for my cat.", "Write a sentence to cheer up a friend."),
    },
    "recommend": {
        "zh": ("推荐一本适合入门的历史书", "周末在家可以做些什么？", "有什么适合全家一起玩的游戏？",
               "推荐一种适合初学者的乐器", "下雨天可以去哪里玩？", "有什么简单的运动适合在家做？"),
        "en": ("Recommend a good book for a beginner in history.", "What can I do at home this weekend?",
               "Suggest a game the whole family can play.", "Which instrument is good for a beginner?",
               "Where can I go on a rainy day?", "What simple exercises can I do at home?"),
    },
    "study": {
        "zh": ("怎样背单词记得更牢？", "做事总是拖延，怎么改？", "如何做好读书笔记？",
               "每天学习多久比较合适？", "准备面试要注意什么？", "怎么提高写作水平？"),
        "en": ("What is a good way to remember new words?", "I keep procrastinating. How can I stop?",
               "How do I take good notes while reading?", "How long should I study each day?",
               "How should I prepare for a job interview?", "How can I improve my writing?"),
    },
    "tech": {
        "zh": ("电脑变慢了怎么办？", "手机电量掉得很快，怎么省电？", "怎样设置一个安全的密码？",
               "Wi-Fi信号不好怎么办？", "如何备份手机里的照片？", "什么是云存储？"),
        "en": ("My computer is getting slow. What can I do?", "How can I make my phone battery last longer?",
               "How do I make a strong password?", "My Wi-Fi signal is weak. Any tips?",
               "How do I back up the photos on my phone?", "What is cloud storage?"),
    },
    "health": {
        "zh": ("每天喝多少水比较好？", "久坐对身体有什么影响？", "感冒了应该多休息吗？",
               "怎样保护眼睛？", "跑步前要热身吗？", "晚上几点睡觉比较好？"),
        "en": ("How much water should I drink a day?", "Is sitting all day bad for me?",
               "Should I rest when I have a cold?", "How can I protect my eyes?",
               "Should I warm up before running?", "What time should I go to bed?"),
    },
}

# Facts with checkable answers, none of them in the replay or eval sets above: (question, accepted answers).
# A fine-tune should keep every one its base got right.
FACT_QUESTIONS: dict[Lang, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "zh": (
        ("哪颗行星被称为红色星球？", ("火星",)), ("水在标准大气压下多少摄氏度沸腾？", ("100", "一百")),
        ("《罗密欧与朱丽叶》的作者是谁？", ("莎士比亚",)), ("世界上最大的海洋是哪个？", ("太平洋",)),
        ("黄金的化学符号是什么？", ("Au",)), ("一天有多少个小时？", ("24", "二十四")),
        ("世界上最高的山峰是哪座？", ("珠穆朗玛", "Everest")), ("离太阳最近的行星是哪颗？", ("水星",)),
        ("巴西人说什么语言？", ("葡萄牙语",)), ("蒙娜丽莎是谁画的？", ("达芬奇", "达·芬奇", "Vinci")),
        ("植物进行光合作用吸收什么气体？", ("二氧化碳", "CO2", "CO₂")), ("一个六边形有几条边？", ("6", "六")),
        ("12乘以12等于多少？", ("144",)), ("第一个登上月球的人是谁？", ("阿姆斯特朗", "Armstrong")),
        ("水的化学式是什么？", ("H2O", "H₂O")), ("地球上有几个大洲？", ("7", "七")),
        ("水在多少摄氏度结冰？", ("0", "零")), ("一小时有多少分钟？", ("60", "六十")),
        ("太阳系最大的行星是哪颗？", ("木星",)), ("相对论是谁提出的？", ("爱因斯坦",)),
        ("闰年有多少天？", ("366",)), ("81的平方根是多少？", ("9", "九")),
        ("哪种动物被称为“丛林之王”？", ("狮子",)), ("电灯泡是谁发明的？", ("爱迪生",)),
        ("日本的货币是什么？", ("日元",)), ("自然界最硬的物质是什么？", ("金刚石", "钻石")),
        ("成年人有多少块骨头？", ("206",)), ("蓝色和黄色混合是什么颜色？", ("绿",)),
        ("我们生活在哪颗行星上？", ("地球",)), ("最小的质数是几？", ("2", "二")),
        ("美国第一任总统是谁？", ("华盛顿",)), ("墨西哥人说什么语言？", ("西班牙语",)),
        ("一把标准吉他有几根弦？", ("6", "六")), ("15加27等于多少？", ("42",)),
        ("100除以4等于多少？", ("25",)), ("一年有几个月？", ("12", "十二")),
        ("哪个器官负责把血液输送到全身？", ("心脏",)), ("离地球最近的恒星是什么？", ("太阳",)),
        ("《哈利·波特》的作者是谁？", ("罗琳",)), ("吉萨金字塔在哪个国家？", ("埃及",)),
        ("三角形有几条边？", ("3", "三")), ("人呼吸需要什么气体？", ("氧",)), ("一年有多少天？", ("365",)),
        ("欧洲和北美洲之间是哪个大洋？", ("大西洋",)), ("《星夜》是谁画的？", ("梵高", "凡高", "Gogh")),
        ("牛油果酱的主要原料是什么？", ("牛油果",)), ("毛毛虫长大后会变成什么？", ("蝴蝶", "蛾")),
        ("哪种金属在室温下是液体？", ("汞", "水银")),
    ),
    "en": (
        ("Which planet is known as the Red Planet?", ("Mars",)),
        ("At what temperature in Celsius does water boil at sea level?", ("100",)),
        ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
        ("What is the largest ocean on Earth?", ("Pacific",)),
        ("What is the chemical symbol for gold?", ("Au",)),
        ("How many hours are there in a day?", ("24", "twenty-four")),
        ("What is the tallest mountain in the world?", ("Everest",)),
        ("Which planet is closest to the Sun?", ("Mercury",)),
        ("What language is spoken in Brazil?", ("Portuguese",)), ("Who painted the Mona Lisa?", ("Vinci",)),
        ("Which gas do plants take in for photosynthesis?", ("carbon dioxide", "CO2", "CO₂")),
        ("How many sides does a hexagon have?", ("6", "six")), ("What is 12 times 12?", ("144",)),
        ("Who was the first person to walk on the Moon?", ("Armstrong",)),
        ("What is the chemical formula of water?", ("H2O", "H₂O")),
        ("How many continents are there?", ("7", "seven")),
        ("At what temperature in Celsius does water freeze?", ("0", "zero")),
        ("How many minutes are there in an hour?", ("60", "sixty")),
        ("What is the largest planet in our solar system?", ("Jupiter",)),
        ("Who developed the theory of relativity?", ("Einstein",)),
        ("How many days are there in a leap year?", ("366",)),
        ("What is the square root of 81?", ("9", "nine")),
        ("Which animal is known as the king of the jungle?", ("lion",)),
        ("Who invented the light bulb?", ("Edison",)), ("What is the currency of Japan?", ("yen",)),
        ("What is the hardest natural substance?", ("diamond",)),
        ("How many bones are there in the adult human body?", ("206",)),
        ("What color do you get when you mix blue and yellow?", ("green",)),
        ("Which planet do we live on?", ("Earth",)), ("What is the smallest prime number?", ("2", "two")),
        ("Who was the first president of the United States?", ("Washington",)),
        ("What language do people speak in Mexico?", ("Spanish",)),
        ("How many strings does a standard guitar have?", ("6", "six")), ("What is 15 plus 27?", ("42",)),
        ("What is 100 divided by 4?", ("25",)), ("How many months are there in a year?", ("12", "twelve")),
        ("Which organ pumps blood through the body?", ("heart",)),
        ("What is the closest star to Earth?", ("Sun",)), ("Who wrote the Harry Potter books?", ("Rowling",)),
        ("In which country are the pyramids of Giza?", ("Egypt",)),
        ("How many sides does a triangle have?", ("3", "three")),
        ("Which gas do people need to breathe to live?", ("oxygen",)),
        ("How many days are there in a year?", ("365",)),
        ("Which ocean lies between Europe and North America?", ("Atlantic",)),
        ("Who painted The Starry Night?", ("Gogh",)),
        ("What is the main ingredient of guacamole?", ("avocado",)),
        ("What do caterpillars turn into?", ("butterfly", "butterflies", "moth")),
        ("Which metal is liquid at room temperature?", ("mercury",)),
    ),
}


def everyday_prompts() -> list[dict[str, str]]:
    """The everyday prompts as [{"prompt", "lang", "family"}], zh then en within each family."""
    rows = [{"prompt": p, "lang": lang, "family": family} for family, by_lang in EVERYDAY_PROMPTS.items()
            for lang, prompts in by_lang.items() for p in prompts]
    flagged = [r["prompt"] for r in rows if is_identity_prompt(r["prompt"])]
    if flagged:  # guards the table: these must not be questions about the assistant
        raise ValueError(f"everyday prompts that ask about the assistant itself: {flagged}")
    return rows


def fact_questions() -> list[dict[str, object]]:
    """The fact questions as [{"prompt", "lang", "family": "fact", "answers": [...]}]."""
    return [{"prompt": q, "lang": lang, "family": "fact", "answers": list(answers)}
            for lang, rows in FACT_QUESTIONS.items() for q, answers in rows]
