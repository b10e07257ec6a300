# Open-ended replay prompts (zh + en) for real base models: everyday questions in families that neither the
# evaluation's everyday prompts nor its fact questions come from. Library module, no CLI; inspect it with:
#   python -c "from training.open_prompts import open_prompts; print(len(open_prompts()))"
# Why: general_chat's replay prompts are templated facts and sums ("法国的首都是哪里？"). A real model
# tuned on those next to ~90 identity questions learns "an open question gets the identity answer" (the
# smol preset leaked its identity into 33 % of Chinese everyday answers). Replaying the base's own answers
# to open questions, some addressed to the assistant ("你觉得…", "Can you help me…"), shows where the
# identity answer does not go.
# The tiny preset does not use them: its base only knows general_chat's tables.
from __future__ import annotations

from training.general_chat import Lang

OPEN_PROMPTS: dict[str, dict[Lang, tuple[str, ...]]] = {
    "history": {
        "zh": ("丝绸之路是什么？", "古埃及人为什么要建金字塔？", "第二次世界大战是哪一年结束的？",
               "中国古代的四大发明是什么？", "唐朝的都城在哪里？", "文艺复兴是什么？",
               "长城最早是为什么修建的？", "工业革命带来了哪些变化？"),
        "en": ("What was the Silk Road?", "Why did the ancient Egyptians build pyramids?",
               "When did World War II end?", "Who was Julius Caesar?", "What was the Industrial Revolution?",
               "Why was the Great Wall of China built?", "What was the Renaissance?",
               "Who was Napoleon Bonaparte?"),
    },
    "geography": {
        "zh": ("尼罗河流经哪些国家？", "撒哈拉沙漠在哪个洲？", "日本由哪几个主要岛屿组成？",
               "亚马孙雨林在哪里？", "为什么荷兰被称为低地国家？", "世界上最长的河流是哪条？",
               "澳大利亚有哪些有名的城市？", "黄河为什么是黄色的？"),
        "en": ("Which countries does the Nile flow through?", "On which continent is the Sahara Desert?",
               "Where is the Amazon rainforest?", "Why is the Netherlands called the Low Countries?",
               "What is the longest river in the world?", "What are some famous cities in Australia?",
               "How many islands make up Japan?", "Why is the Dead Sea called dead?"),
    },
    "animals": {
        "zh": ("养金鱼要注意什么？", "猫为什么喜欢晒太阳？", "狗狗一天要遛几次？", "企鹅生活在哪里？",
               "蜜蜂是怎么酿蜜的？", "仓鼠可以吃什么？", "大象能活多少年？", "给小狗洗澡要注意什么？"),
        "en": ("How do I look after a goldfish?", "Why do cats like sitting in the sun?",
               "How often should I walk my dog?", "Where do penguins live?", "How do bees make honey?",
               "What can a hamster eat?", "How long do elephants live?", "How do I give my puppy a bath?"),
    },
    "sports": {
        "zh": ("足球比赛每队上场几个人？", "成年人怎么学会游泳？", "乒乓球的基本规则是什么？",
               "马拉松全程有多长？", "篮球是谁发明的？", "打羽毛球怎么发球？", "奥运会多少年举办一次？",
               "初学者怎么开始练瑜伽？"),
        "en": ("How many players are on a football team?", "How can an adult learn to swim?",
               "What are the basic rules of table tennis?", "How long is a marathon?",
               "Who invented basketball?", "How do you serve in badminton?",
               "How often are the Olympic Games held?", "How should a beginner start yoga?"),
    },
    "home": {
        "zh": ("怎么去除衣服上的油渍？", "冰箱有异味怎么办？", "怎样整理衣柜更省空间？", "木地板怎么清洁？",
               "搬家要提前准备什么？", "厨房水槽堵了怎么办？", "窗户玻璃怎么擦才不留痕？",
               "家里有蚂蚁怎么办？"),
        "en": ("How do I get an oil stain out of a shirt?", "My fridge smells bad. What should I do?",
               "How can I organise my wardrobe to save space?", "How do I clean a wooden floor?",
               "What should I prepare before moving house?", "My kitchen sink is blocked. What can I do?",
               "How do I clean windows without streaks?", "How do I get rid of ants in the house?"),
    },
    "money": {
        "zh": ("怎样做一个月的预算？", "买二手车要注意什么？", "什么是复利？", "网购怎么避免买到假货？",
               "信用卡和借记卡有什么区别？", "刚工作怎么开始存钱？", "什么是通货膨胀？",
               "租房要注意哪些事？"),
        "en": ("How do I make a monthly budget?", "What should I check when buying a used car?",
               "What is compound interest?", "How can I avoid fake goods when shopping online?",
               "What is the difference between a credit card and a debit card?",
               "How can I start saving money?", "What is inflation?",
               "What should I check before renting a flat?"),
    },
    "work": {
        "zh": ("第一天上班要注意什么？", "怎么和新同事相处？", "怎样向老板提加薪？", "怎么安排一天的工作？",
               "远程办公有哪些好处？", "辞职前需要做哪些准备？", "开会时怎样表达不同意见？",
               "怎样带好一个小团队？"),
        "en": ("What should I keep in mind on my first day at work?",
               "How do I get along with new colleagues?",
               "How do I ask my boss for a raise?", "How should I plan my working day?",
               "What are the benefits of working from home?", "What should I do before quitting my job?",
               "How can I disagree politely in a meeting?", "How do I lead a small team well?"),
    },
    "hobbies": {
        "zh": ("怎么折一只纸鹤？", "摄影新手怎么拍好照片？", "钓鱼需要准备什么？", "怎么开始学织毛衣？",
               "集邮有什么乐趣？", "拼图有什么技巧？", "多肉植物怎么养？", "象棋的基本规则是什么？"),
        "en": ("How do I fold a paper crane?", "How can a beginner take better photos?",
               "What do I need to go fishing?", "How do I start knitting?", "Why do people collect stamps?",
               "Any tips for doing a jigsaw puzzle?", "How do I care for a succulent?",
               "What are the basic rules of chess?"),
    },
    "culture": {
        "zh": ("“画蛇添足”是什么意思？", "春节有哪些传统习俗？", "中秋节为什么吃月饼？", "端午节是纪念谁的？",
               "“一石二鸟”是什么意思？", "筷子怎么用才正确？", "西方人过感恩节吃什么？",
               "英语里的 break a leg 是什么意思？"),
        "en": ("What does the idiom 'break a leg' mean?", "What are the traditions of Chinese New Year?",
               "Why do people eat mooncakes at the Mid-Autumn Festival?",
               "What do people eat at Thanksgiving?",
               "What does 'kill two birds with one stone' mean?", "How do you use chopsticks properly?",
               "What is Halloween about?", "Why do people give gifts at Christmas?"),
    },
    "maths": {
        "zh": ("一个长方形长5米宽3米，面积是多少？", "什么是质数？", "怎么计算一组数的平均数？",
               "一件衣服打八折后是80元，原价多少？", "三角形的内角和是多少度？", "什么是百分比？",
               "每小时走5公里，走15公里要多久？", "为什么负数乘负数得正数？"),
        "en": ("A rectangle is 5 m long and 3 m wide. What is its area?", "What is a prime number?",
               "How do I work out the average of some numbers?",
               "A shirt costs 80 after a 20% discount. What was the original price?",
               "What do the angles of a triangle add up to?", "What is a percentage?",
               "If I walk 5 km an hour, how long does 15 km take?",
               "Why is a negative times a negative positive?"),
    },
    "requests": {
        "zh": ("帮我想一个周末聚会的主题", "你能帮我列一个露营的清单吗？", "帮我安排一下明天的日程",
               "给我讲一个笑话吧", "你能给我出一道谜语吗？", "我想给妈妈准备一个惊喜，有什么主意？",
               "帮我想三个公司团建活动", "跟我玩个成语接龙吧"),
        "en": ("Help me pick a theme for a weekend party.", "Can you make me a camping checklist?",
               "Help me plan my day tomorrow.", "Tell me a joke.", "Can you give me a riddle?",
               "I want to surprise my mum. Any ideas?", "Suggest three team-building activities.",
               "Let's play a word game."),
    },
    "opinions": {
        "zh": ("你觉得猫和狗哪个更好养？", "你喜欢哪个季节？", "你觉得早起好还是晚睡好？", "你会下象棋吗？",
               "你觉得学一门外语难吗？", "你觉得人为什么需要朋友？", "你喜欢看电影吗？",
               "你觉得城市生活和乡村生活哪个好？"),
        "en": ("Do you think cats or dogs make better pets?", "Which season do you like best?",
               "Is it better to be an early bird or a night owl?", "Do you play chess?",
               "Do you think learning a new language is hard?", "Why do you think people need friends?",
               "Do you like films?", "Is city life better than country life?"),
    },
    "lookalikes": {  # shaped like the identity questions (introduce…, who made…, what can… do) but about
        # something else: the identity answer belongs to the question's subject, not to its form
        "zh": ("请介绍一下长城", "介绍一下大熊猫吧", "电话是谁发明的？", "《西游记》是谁写的？",
               "计算器能做什么？", "蜜蜂擅长做什么？", "你知道机器人是怎么工作的吗？", "给我讲讲月球"),
        "en": ("Introduce the Great Wall of China.", "Tell me about giant pandas.",
               "Who invented the telephone?", "Who wrote Pride and Prejudice?", "What can a calculator do?",
               "What are dolphins good at?", "Do you know how a robot works?", "Tell me about the Moon."),
    },
}


def open_prompts() -> list[str]:
    """All open-ended replay prompts, family by family, zh then en within each family."""
    return [p for by_lang in OPEN_PROMPTS.values() for prompts in by_lang.values() for p in prompts]
