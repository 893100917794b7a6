
%
minedev"zh*seed2

€÷ 