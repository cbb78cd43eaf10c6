"""The fixed text the demo tokenizer is trained on.

Kept in the source so that `muxserve make-models` builds the same tokenizer on every machine, with
no download. It mixes plain English, code-like text and numbers with accented Latin, Greek,
Cyrillic, CJK and emoji, so that rare multi-byte characters stay split across byte tokens (the
case incremental detokenization must get right) while common ones merge.
"""

from __future__ import annotations

# ruff: noqa: E501 (prose: lines are as long as the text needs)

DEMO_CORPUS = """\
The river ran quietly past the old mill, where the miller's daughter sat reading a letter from her
brother. He had gone north to work on the railway, and every week he wrote about the mountains, the
snow that never melted, and the cooks who served the same soup for breakfast, lunch and dinner.
She folded the letter, put it back in the envelope, and walked down to the water to think.

A language model reads text as a sequence of tokens. Each token is a small piece of a word, a whole
word, a space followed by a word, or a single byte. The model predicts the next token from the ones
before it, one step at a time, and a sampler picks a token from the predicted distribution. Greedy
decoding always takes the most likely token; temperature, top-k and top-p sampling trade some
accuracy for variety. Serving many models on one machine means sharing memory between them: the
key-value cache of every request lives in blocks that the scheduler hands out and takes back.

In the spring the orchard behind the school turned white with blossom. The children counted the bees
(forty-two, then forty-three, then they lost count) and argued about whether a wasp counts as a bee.
The teacher said no, wasps are wasps; the children said the question was still interesting.
By June there were small green apples, by September red ones, and by October only leaves.

def schedule(queue, budget):
    jobs = []
    for request in queue:
        if request.tokens <= budget:
            jobs.append(request)
            budget -= request.tokens
    return jobs

Numbers appear everywhere: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16, 32, 64, 128, 256, 512, 1024,
2048, 4096. The year 1969, the year 2024, the price $19.99, 3.14159, 2.71828, 100% and 50/50.
Dates like 2024-05-17 and times like 12:30 or 23:59:59 are common in logs and in conversations.

Dear customer, thank you for your order. Your package will arrive on Tuesday between nine and noon.
If nobody is at home, the driver will leave it with a neighbour or at the post office. Please keep
this message: you will need the reference number to collect it. We hope you enjoy your purchase!

Questions and answers. What is the capital of France? Paris. What is the largest planet? Jupiter.
How many legs does a spider have? Eight. Why is the sky blue? Because air scatters blue light more
than red light. Who wrote the play about the prince of Denmark? Shakespeare. Which metal is liquid
at room temperature? Mercury. How far is the moon? About three hundred and eighty thousand kilometres.

Le café de la gare est fermé le dimanche, mais la crêperie à côté reste ouverte. Où est la bibliothèque ?
Ça dépend : l'ancienne est près du marché, la nouvelle derrière l'église. Un élève naïf a demandé au
professeur pourquoi « déjà » prend un accent grave. Die Straße in Zürich führt über eine Brücke; über
den Fluss gehen Fußgänger, Radfahrer und Hunde. Mañana iremos a São Paulo y después a Bogotá, señor.
Smörgåsbord, fjörður, Ærø, Łódź, Dvořák, İstanbul, Ångström, façade, résumé, coöperate, jalapeño.

Ελληνικά: η γλώσσα έχει μακρά ιστορία. Русский язык: быстрая коричневая лиса прыгает через ленивую собаку.
Українська, български, српски. עברית נכתבת מימין לשמאל. العربية تكتب من اليمين إلى اليسار. हिन्दी भाषा।

中文：今天天气很好，我们去公园散步吧。机器学习模型需要大量的数据。服务器同时运行多个模型。
日本語：東京の春は桜がきれいです。ひらがな、カタカナ、漢字を使います。ありがとうございます。
한국어: 안녕하세요. 오늘 날씨가 좋네요. 감사합니다. 모델이 토큰을 하나씩 생성합니다.

Emoji say a lot in few bytes: 🙂 😀 🚀 🌍 🎉 👍 ❤️ 🔥 ✨ 🐍 🦀 ☕ 🍕 🌧️ ⚡ 🧪 👩‍💻 🏳️‍🌈 🇫🇷 🇯🇵.
Symbols: © ® ™ € £ ¥ ° ± × ÷ ≤ ≥ ≠ ≈ ∞ √ ∑ ∫ π λ µ Ω → ← ↑ ↓ ✓ ✗ • … — – « » „ “ ” ‘ ’.

The storm came in the night. Rain hammered on the roof, the wind pulled at the shutters, and the
lights went out a little after two. In the morning the street was covered with branches, a fence had
fallen into the neighbour's garden, and the river had risen almost to the bridge. By noon the sun was
out again, the children were splashing in puddles, and the old men on the bench were saying that it
had been worse in their day, much worse, and that nobody remembered the winter of the great flood.

Recipe for a simple bread: mix five hundred grams of flour, ten grams of salt, seven grams of yeast
and three hundred and fifty millilitres of warm water. Knead for ten minutes, let the dough rise for
an hour, shape it, let it rise again, and bake it in a hot oven for thirty-five minutes until the
crust is brown and the loaf sounds hollow when you tap the bottom. Let it cool before you cut it.

User: Can you summarise this article in three sentences?
Assistant: Sure. The article describes how a small team built a system that serves several language
models on a few shared graphics cards. It explains that the models take turns and share one pool of
memory for their caches. It ends by measuring throughput and latency against simpler designs.
User: Thanks! What are the main trade-offs?
Assistant: Sharing saves memory and money, but a busy model can slow down its neighbours, so the
scheduler must give each model a fair share of compute and memory while keeping latency low.
"""
